"""The Python side of the c10d transport: naming groups for the C++ side,
creating subgroups, and the timeout every blocking wait honours."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from alltoall._env import env_float

TIMEOUT_ENV = "ALLTOALL_TIMEOUT"
DEFAULT_TIMEOUT = timedelta(minutes=10)


def resolve_timeout(timeout: timedelta | float | None) -> timedelta:
    """``timeout`` as a timedelta; None means ``ALLTOALL_TIMEOUT`` seconds, else 10 minutes."""
    if timeout is None:
        timeout = env_float(TIMEOUT_ENV, "a number of seconds")
        if timeout is None:
            return DEFAULT_TIMEOUT
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return timeout


@dataclass(frozen=True)
class GroupRef:
    """A process group as the C++ transport sees it: its registered name and
    its members' global ranks."""

    group: dist.ProcessGroup
    name: str
    global_ranks: tuple[int, ...]

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> GroupRef:
        group = group if group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        return cls(group, group.group_name, tuple(dist.get_process_group_ranks(group)))

    def for_cpp(self) -> tuple[str, list[int]]:
        return self.name, list(self.global_ranks)


def splits_parent_communicator() -> bool:
    """Whether torch builds subgroups by splitting a parent's communicator.

    That is the case when the default group was created with ``device_id=``
    (eager NCCL): ``new_group`` then calls ``ncclCommSplit`` on the default
    group's communicator, a collective over every rank of it, so a subgroup
    created by its members alone (local synchronisation) would block them.
    """
    if not dist.is_initialized():
        return False
    default = dist.distributed_c10d._get_default_group()
    device = getattr(default, "bound_device_id", None)
    if device is None:
        return False
    try:
        backend = default._get_backend(device)
    except RuntimeError:
        return False
    return bool(getattr(backend, "supports_splitting", False))


def new_subgroups(parent: GroupRef, parts: Sequence[Sequence[int]], timeout: timedelta,
                  description: str) -> GroupRef | None:
    """This rank's part of ``parts`` as a process group; None when it is in none.

    ``parts`` are disjoint lists of global ranks of ``parent``. Every rank of
    the parent calls this with the same ``parts``, in the same order relative
    to other group creation. How the groups are made depends on the mode:

    - no bound device (gloo, lazily initialised NCCL): each rank creates only
      its own part, with local synchronisation, so no other rank waits;
    - a bound device (``splits_parent_communicator()``): one ``split_group``
      of the parent into all the parts, which every rank of the parent joins,
      so the communicator split NCCL performs is collective over the parent
      and no rank returns early.
    """
    parts = [sorted(part) for part in parts]
    rank = dist.get_rank()
    mine = next((part for part in parts if rank in part), None)
    if not parts:
        return None
    if splits_parent_communicator():
        in_parent = {g: i for i, g in enumerate(parent.global_ranks)}
        missing = sorted({g for part in parts for g in part} - set(in_parent))
        if missing:
            raise ValueError(f"{description}: global ranks {missing} are not in the parent group {parent.global_ranks}")
        group = dist.split_group(parent.group, [[in_parent[g] for g in part] for part in parts], timeout=timeout,
                                 group_desc=description)
        return GroupRef.of(group) if mine is not None else None
    if mine is None:
        return None
    group = dist.new_group(mine, timeout=timeout, use_local_synchronization=True, group_desc=description)
    return GroupRef.of(group)
