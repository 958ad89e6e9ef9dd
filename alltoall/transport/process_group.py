"""The Python side of the c10d transport: naming groups for the C++ side,
creating subgroups, and the timeout every blocking wait honours."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

TIMEOUT_ENV = "ALLTOALL_TIMEOUT"
DEFAULT_TIMEOUT = timedelta(minutes=10)


def resolve_timeout(timeout: timedelta | float | None) -> timedelta:
    """``timeout`` as a timedelta; None means ``ALLTOALL_TIMEOUT`` seconds, else 10 minutes."""
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if not raw:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
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


def new_subgroup(global_ranks: Sequence[int], timeout: timedelta, description: str) -> GroupRef:
    """Creates a subgroup; only its members call this, each exactly once.

    Local synchronisation lets every rank create just the subgroups it
    belongs to. Callers must create them in the same order on every rank.
    """
    group = dist.new_group(sorted(global_ranks), timeout=timeout, use_local_synchronization=True,
                           group_desc=description)
    return GroupRef.of(group)
