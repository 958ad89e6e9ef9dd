"""The shared-memory transport's Python side: its options and the
rendezvous of one segment per group. Rank 0's choice of segment reaches the
others through a pluggable agreement: a broadcast over the group (the
Communicator) or a key of the group's store (the alltoall c10d backend,
whose groups cannot run collectives while they are being created).

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

import json
import os
import secrets
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta

import torch.distributed as dist

from alltoall._env import env_int
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


def segment_prefix() -> str:
    """``ALLTOALL_SHM_PREFIX`` or the default; raises ValueError naming it
    when it holds a '/' (a POSIX shared-memory name has only the leading one)."""
    prefix = os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX
    if "/" in prefix:
        raise ValueError(f"{PREFIX_ENV}={prefix!r} must not contain '/'")
    return prefix


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
        ring = env_int(RING_BYTES_ENV, default_ring, 64)
        if ring % 64:
            raise ValueError(f"{RING_BYTES_ENV}={ring} must be a multiple of 64")
        return cls(
            ring_bytes=ring,
            single_copy_bytes=env_int(SINGLE_COPY_BYTES_ENV, DEFAULT_SINGLE_COPY_BYTES, 0),
            spins=env_int(SPINS_ENV, DEFAULT_SPINS, 0),
            yields=env_int(YIELDS_ENV, DEFAULT_YIELDS, 0),
        )


@dataclass(frozen=True)
class ShmOffer:
    """What group rank 0 decides for a segment and every member must use.
    Rank 0 creates the segment before it publishes the offer; ``failure`` is
    its error when it could not (``space``: /dev/shm was too small)."""

    name: str
    token: str
    options: ShmOptions
    failure: str | None = None
    space: bool = False

    @classmethod
    def draw(cls, members: int, prefix: str) -> ShmOffer:
        """A random segment name after ``prefix`` and job token, and the options from the environment."""
        return cls(f"/{prefix}{os.getpid()}-{secrets.token_hex(8)}", secrets.token_hex(16),
                   ShmOptions.from_env(members))

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "token": self.token, "options": asdict(self.options),
                           "failure": self.failure, "space": self.space})

    @classmethod
    def from_json(cls, text: str | bytes) -> ShmOffer:
        raw = json.loads(text)
        return cls(raw["name"], raw["token"], ShmOptions(**raw["options"]), raw.get("failure"),
                   bool(raw.get("space", False)))


# How the members agree on rank 0's offer: rank 0 passes its offer, the
# others None, and all get rank 0's back.
Agreement = Callable[[ShmOffer | None], ShmOffer]


def broadcast_agreement(group: GroupRef) -> Agreement:
    """Through the group itself (a Communicator's groups): one broadcast."""

    def agree(offer: ShmOffer | None) -> ShmOffer:
        box: list[object] = [offer]
        dist.broadcast_object_list(box, src=group.global_ranks[0], group=group.group)
        return box[0]  # type: ignore[return-value]

    return agree


def store_agreement(store: dist.Store, key: str, timeout: timedelta) -> Agreement:
    """Through a key of a c10d store, waiting at most ``timeout``: for groups
    that cannot run collectives yet (the alltoall backend's, while torch
    creates them)."""

    def agree(offer: ShmOffer | None) -> ShmOffer:
        if offer is not None:
            store.set(key, offer.to_json())
            return offer
        try:
            store.wait([key], timeout)
        except RuntimeError as error:
            raise RuntimeError(f"shared-memory set-up: group rank 0 did not publish '{key}' within "
                               f"{timeout.total_seconds():.0f} s: {error}") from None
        return ShmOffer.from_json(store.get(key))

    return agree


@dataclass(frozen=True)
class ShmMembers:
    """A group as the segment sees it: its name (for messages), its members'
    global ranks and this process's rank among them."""

    name: str
    global_ranks: tuple[int, ...]
    rank: int


def segment_bytes(members: int, ring_bytes: int) -> int:
    """Bytes of /dev/shm that the segment of a group of ``members`` takes
    with rings of ``ring_bytes``: a header of 4 KiB pages (the members'
    ranks, pids and 512-byte abort slots) plus ``members * 128`` bytes of
    doorbells and probes, ``2 * members**2 * 64`` of counters and
    ``members**2 * ring_bytes`` of rings, rounded up to 4 KiB."""
    return int(_C.shm_segment_bytes(members, ring_bytes))


def create_shm_transport(members: ShmMembers, host: str, timeout: timedelta, fallback: _C.Transport | None,
                         agree: Agreement, allow_fallback: bool = False) -> _C.Transport:
    """A shared-memory transport for a group whose members all run on
    ``host``. Collective over the group: rank 0 draws a random segment name
    and job token (the name starts with ``ALLTOALL_SHM_PREFIX``), creates the
    segment (mode 0600, its bytes reserved in /dev/shm) and only then lets
    ``agree`` hand name, token and options to the others, who attach; every
    member unlinks the name once all are attached. ``fallback`` carries
    tensors that are not in host memory (None: they are an error).

    When rank 0 cannot create the segment, every member raises
    ``DistBackendError`` with rank 0's error (for a full /dev/shm: the bytes
    needed, the bytes free and the remedies), except that with
    ``allow_fallback`` (``transport="auto"``) a group whose /dev/shm is too
    small returns ``fallback`` (c10d) on every member instead, and rank 0
    warns once."""
    prefix = segment_prefix()  # checked on every rank, before any communication
    created = None
    if members.rank == 0:
        offer = ShmOffer.draw(len(members.global_ranks), prefix)
        try:
            created = _C.shm_create_segment(offer.name, offer.token, list(members.global_ranks),
                                            timeout.total_seconds(), offer.options.ring_bytes)
        except _C.ShmSpaceError as error:
            offer = replace(offer, failure=str(error), space=True)
        except _C.ShmError as error:
            offer = replace(offer, failure=str(error))
        try:
            agree(offer)
        except BaseException:
            if created is not None:
                created.unlink()
            raise
    else:
        offer = agree(None)
    if offer.failure is not None:
        where = (f"group '{members.name}' (global ranks {list(members.global_ranks)}): group rank 0 (global rank "
                 f"{members.global_ranks[0]}) could not create its shared-memory segment on host {host}")
        if offer.space and allow_fallback and fallback is not None:
            if members.rank == 0:
                warnings.warn(f"alltoall: {where}, so this group uses c10d ({fallback.kind}) instead, on every "
                              f"member: {offer.failure}", RuntimeWarning, stacklevel=2)
            return fallback
        raise dist.DistBackendError(f"alltoall: shared-memory set-up of {where}: {offer.failure}")
    return _C.shm_transport(
        segment_name=offer.name,
        token=offer.token,
        global_ranks=list(members.global_ranks),
        rank=members.rank,
        timeout_seconds=timeout.total_seconds(),
        ring_bytes=offer.options.ring_bytes,
        single_copy_bytes=offer.options.single_copy_bytes,
        spins=offer.options.spins,
        yields=offer.options.yields,
        group_name=members.name,
        host=host,
        fallback=fallback,
        created=created,
    )


def abort_transports(transports: object, reason: str) -> None:
    """Marks every shared-memory transport among ``transports`` (an iterable
    of ``_C.Transport``) aborted by this rank with ``reason``: their other
    members raise within their next check (at most about 0.2 s), naming
    this rank and ``reason``, and every later call on them raises at once.
    c10d transports are left alone (gloo offers no abort)."""
    for transport in transports:  # type: ignore[attr-defined]
        if transport.kind == "shm":
            transport.abort(reason)
