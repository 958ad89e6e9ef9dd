"""Which transport carries a group's bytes, by link class.

- ``"shm"``: the shared-memory transport; every member must run on one host.
- ``"c10d"``: the group's torch.distributed backend (gloo's TCP, NCCL, MPI).
- ``"auto"`` (default; ``ALLTOALL_TRANSPORT`` overrides): shared memory when
  every member runs on one host (the real host, never an emulated node) and
  the group's backend handles host tensors; c10d otherwise. CUDA tensors
  always go through c10d (NCCL), whatever the choice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist

from alltoall._library import _C
from alltoall.plan.profile import LINK_CLASSES as PROFILE_LINK_CLASSES
from alltoall.topology import host_name
from alltoall.transport.process_group import GroupRef
from alltoall.transport.shm import ShmMembers, broadcast_agreement, create_shm_transport

TRANSPORTS = ("auto", "shm", "c10d")
TRANSPORT_ENV = "ALLTOALL_TRANSPORT"

# Link classes, by what carries the bytes: defined with the cost model's
# profiles (alltoall.plan.profile), which are keyed by them.
LINK_CLASSES = PROFILE_LINK_CLASSES


def resolve_transport(requested: str | None) -> str:
    """The request, or ``ALLTOALL_TRANSPORT``, or "auto"; ValueError if unknown."""
    source = "transport"
    if requested is None:
        requested = os.environ.get(TRANSPORT_ENV) or "auto"
        source = TRANSPORT_ENV
    if requested not in TRANSPORTS:
        raise ValueError(f"{source}={requested!r} is not one of {', '.join(TRANSPORTS)}")
    return requested


def handles_host_tensors(group: dist.ProcessGroup) -> bool:
    """Whether the group's c10d backend takes host tensors (not NCCL): where
    it does not, no group of it uses shared memory."""
    backend = str(dist.get_backend(group)).lower()
    return backend != "nccl"


def transport_kind(name: str, global_ranks: Sequence[int], hosts: Sequence[str], requested: str,
                   host_tensors: bool) -> str:
    """"shm" or "c10d" for one group, from its members' host identities
    (group order), a resolved request, and whether its c10d backend handles
    host tensors. ValueError when shared memory is requested across hosts."""
    if requested == "c10d" or len(global_ranks) == 1:
        return "c10d"
    on_one_host = len(set(hosts)) == 1
    if requested == "shm":
        if not on_one_host:
            spread = sorted({host_name(h) for h in hosts})
            raise ValueError(
                f"transport='shm' needs every member of group '{name}' (global ranks "
                f"{list(global_ranks)}) on one host, but they run on {', '.join(spread)}"
            )
        return "shm"
    return "shm" if on_one_host and host_tensors else "c10d"


def make_transport(group: GroupRef, hosts: Sequence[str], requested: str, timeout: timedelta) -> _C.Transport:
    """The transport of one group. ``hosts`` is every member's host identity
    (group order), ``requested`` a resolved choice. Collective over the group
    when it creates a shared-memory segment."""
    c10d = _C.c10d_transport(group.name, list(group.global_ranks), timeout.total_seconds())
    kind = transport_kind(group.name, group.global_ranks, hosts, requested, handles_host_tensors(group.group))
    if kind == "c10d":
        return c10d
    members = ShmMembers(group.name, group.global_ranks, dist.get_rank(group.group))
    return create_shm_transport(members, host_name(hosts[0]), timeout, c10d, broadcast_agreement(group),
                                allow_fallback=requested == "auto")


def link_class(transport: _C.Transport, hosts: Sequence[str]) -> str:
    """The link class of a transport: "shm", "loopback" (gloo on one host),
    "tcp" (gloo across hosts), "nvlink" (NCCL on one host) or "net" (NCCL
    across hosts); another backend's own name. Gloo on one host and across
    hosts are two classes as NCCL's are: loopback TCP moves bytes at memory
    speed, a network at the link's rate, and one cost for both fitted
    neither (on the emulated 2x4 cluster, 2026-12-01, docs/performance.md)."""
    kind = transport.kind
    if kind == "shm":
        return "shm"
    backend = kind.removeprefix("c10d:")
    if backend == "gloo":
        return "loopback" if len(set(hosts)) == 1 else "tcp"
    if backend == "nccl":
        return "nvlink" if len(set(hosts)) == 1 else "net"
    return backend
