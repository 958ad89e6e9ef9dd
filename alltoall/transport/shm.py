"""The shared-memory transport's Python side: its options and the
rendezvous of one segment per group, agreed through the group itself.

Options (environment; the group's rank 0 decides, and its values travel with
the segment name, so every member lays out the segment the same way):

- ``ALLTOALL_SHM_RING_BYTES``: bytes of the ring of each ordered pair of
  members. Default: 256 KiB, less for large groups (64 MiB / p^2, at least
  4 KiB). Messages larger than a ring stream through it in chunks.
- ``ALLTOALL_SHM_SINGLE_COPY_BYTES``: messages of at least this many bytes are
  read straight from the sender's memory (process_vm_readv, one copy instead
  of two) when the kernel allows it; 0 disables. Default 64 KiB.
- ``ALLTOALL_SHM_SPINS`` / ``ALLTOALL_SHM_YIELDS``: polls, then sched_yield
  calls, before a waiting rank sleeps on a futex (docs/architecture.md).
- ``ALLTOALL_SHM_PREFIX``: the start of segment names (default
  ``alltoall-``), so that one job's segments can be told from another's; the
  name goes on with the creator's pid and random hex.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from alltoall._library import _C
from alltoall.transport.process_group import GroupRef

RING_BYTES_ENV = "ALLTOALL_SHM_RING_BYTES"
SINGLE_COPY_BYTES_ENV = "ALLTOALL_SHM_SINGLE_COPY_BYTES"
SPINS_ENV = "ALLTOALL_SHM_SPINS"
YIELDS_ENV = "ALLTOALL_SHM_YIELDS"
PREFIX_ENV = "ALLTOALL_SHM_PREFIX"

MAX_RING_BYTES = 256 * 1024
MIN_RING_BYTES = 4 * 1024
RINGS_BUDGET_BYTES = 64 * 1024 * 1024
DEFAULT_SINGLE_COPY_BYTES = 64 * 1024
DEFAULT_SPINS = 32
DEFAULT_YIELDS = 64
DEFAULT_PREFIX = "alltoall-"


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class ShmOptions:
    """How a group's segment is laid out and how its members wait."""

    ring_bytes: int
    single_copy_bytes: int
    spins: int
    yields: int

    @classmethod
    def from_env(cls, members: int) -> ShmOptions:
        default_ring = max(MIN_RING_BYTES, min(MAX_RING_BYTES, RINGS_BUDGET_BYTES // max(1, members * members)))
        ring = _env_int(RING_BYTES_ENV, default_ring, 64)
        if ring % 64:
            raise ValueError(f"{RING_BYTES_ENV}={ring} must be a multiple of 64")
        return cls(
            ring_bytes=ring,
            single_copy_bytes=_env_int(SINGLE_COPY_BYTES_ENV, DEFAULT_SINGLE_COPY_BYTES, 0),
            spins=_env_int(SPINS_ENV, DEFAULT_SPINS, 0),
            yields=_env_int(YIELDS_ENV, DEFAULT_YIELDS, 0),
        )


def create_shm_transport(group: GroupRef, host: str, timeout: timedelta, fallback: _C.Transport) -> _C.Transport:
    """A shared-memory transport for ``group``, whose members all run on
    ``host``. Collective over the group: rank 0 draws a random segment name
    and job token and broadcasts them with its options; it creates the
    segment (mode 0600), the others attach, and every member unlinks the
    name once all are attached. ``fallback`` carries tensors that are not in
    host memory."""
    size = len(group.global_ranks)
    rank = dist.get_rank(group.group)
    offer: list[object] = [None]
    if rank == 0:
        prefix = os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX
        if "/" in prefix:
            raise ValueError(f"{PREFIX_ENV}={prefix!r} must not contain '/'")
        name = f"/{prefix}{os.getpid()}-{secrets.token_hex(8)}"
        offer = [(name, secrets.token_hex(16), ShmOptions.from_env(size))]
    dist.broadcast_object_list(offer, src=group.global_ranks[0], group=group.group)
    name, token, options = offer[0]  # type: ignore[misc]
    return _C.shm_transport(
        segment_name=name,
        token=token,
        global_ranks=list(group.global_ranks),
        rank=rank,
        timeout_seconds=timeout.total_seconds(),
        ring_bytes=options.ring_bytes,
        single_copy_bytes=options.single_copy_bytes,
        spins=options.spins,
        yields=options.yields,
        group_name=group.name,
        host=host,
        fallback=fallback,
    )
