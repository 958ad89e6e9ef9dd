"""The shared-memory segment's abort word (issue 24): a rank that fails
alone, an explicit abort(), a sender that gives up on a single-copy buffer,
and impossible values written into the segment by a peer. The peers raise
an error naming the failing rank and its message, well before the
timeout, and the segment stays broken."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall._library import _C
from alltoall.topology import detect_hosts
from alltoall.transport import GroupRef, make_transport

TIMEOUT_S = 60  # peers must raise long before this: they read the abort word, not the clock


def _shm(timeout_s: float = TIMEOUT_S):
    ref = GroupRef.of(None)
    transport = make_transport(ref, detect_hosts(ref.group), "shm", timedelta(seconds=timeout_s))
    assert transport.kind == "shm"
    return transport


def _rank_fails_alone() -> tuple[str, float, str]:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(transport="shm", timeout=TIMEOUT_S)
    x = torch.ones(2 * p, 4)
    comm.all_to_all_v(x, [2] * p, [2] * p, "flat")  # one exchange that works
    start = time.monotonic()
    try:
        if rank == 0:
            comm.all_to_all_v(x, [3] * p, [2] * p, "flat")  # splits do not sum to its rows
        else:
            comm.all_to_all_v(x, [2] * p, [2] * p, "flat")
        first = "completed"
    except (ValueError, dist.DistBackendError) as error:
        first = f"{type(error).__name__}: {error}"
    elapsed = time.monotonic() - start
    # Every later call raises at once, on every rank.
    again = time.monotonic()
    with pytest.raises(dist.DistBackendError, match="aborted") as info:
        comm.all_to_all_v(x, [2] * p, [2] * p, "flat")
    assert time.monotonic() - again < TIMEOUT_S / 2
    return first, elapsed, str(info.value)


def test_a_rank_that_fails_alone_stops_its_peers(world_pools):
    results = world_pools.run(4, _rank_fails_alone, deadline_s=TIMEOUT_S)
    first0, _, later0 = results[0]
    assert first0.startswith("ValueError") and "input_splits" in first0, first0
    for rank, (first, elapsed, later) in enumerate(results[1:], start=1):
        assert first.startswith("DistBackendError"), f"rank {rank}: {first}"
        assert "group rank 0 (global rank 0) failed: all_to_all_v: ValueError" in first, first
        assert "input_splits" in first, first  # rank 0's own message travels
        assert "timed out" not in first
        assert elapsed < TIMEOUT_S / 2, f"rank {rank} waited {elapsed:.1f} s: the timeout, not the abort word"
        assert "group rank 0 (global rank 0) failed" in later
    assert "group rank 0 (global rank 0) failed" in later0


def _explicit_abort() -> tuple[str, float]:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(transport="shm", timeout=TIMEOUT_S)
    x = torch.ones(p * 1000, 8)
    comm.all_to_all(x, "flat")
    start = time.monotonic()
    if rank == p - 1:
        comm.abort("the trainer gave up on this rank")
        with pytest.raises(dist.DistBackendError, match="aborted"):
            comm.all_to_all(x, "flat")
        dist.barrier()  # stay until the others have seen it
        return "aborted", 0.0
    with pytest.raises(dist.DistBackendError) as info:
        for _ in range(100):
            comm.all_to_all(x, "flat")
    elapsed = time.monotonic() - start
    dist.barrier()
    return str(info.value), elapsed


def test_abort_from_one_rank_stops_the_others(world_pools):
    results = world_pools.run(4, _explicit_abort, deadline_s=TIMEOUT_S)
    for message, elapsed in results[:-1]:
        assert "group rank 3 (global rank 3) failed: the trainer gave up on this rank" in message, message
        assert elapsed < TIMEOUT_S / 2


def _sender_gives_up(bytes_: int) -> str:
    rank = dist.get_rank()
    # Rank 0 waits 1 s for its reader, rank 1 is late: rank 0 gives up on its
    # single-copy buffer (marking the word first), and rank 1 must not read it.
    transport = _shm(1.0 if rank == 0 else TIMEOUT_S)
    x = torch.full((2, bytes_ // 4), float(rank + 1))
    out = torch.zeros_like(x)
    transport.all_to_all(out, x, [], [], "warm-up")
    dist.barrier()
    if rank == 1:
        time.sleep(2.0)
    out.zero_()
    with pytest.raises(dist.DistBackendError) as info:
        transport.all_to_all(out, x, [], [], "late reader")
    if rank == 1:
        # Nothing from rank 0's freed buffer was handed out: the call raised.
        assert "group rank 0 (global rank 0) failed" in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("bytes_", [256 * 1024, 1024], ids=["single-copy", "inline"])
def test_a_sender_that_gives_up_is_named_by_its_reader(world_pools, bytes_):
    messages = world_pools.run(2, _sender_gives_up, bytes_, deadline_s=TIMEOUT_S)
    assert "timed out" in messages[0], messages[0]
    assert "timed out after 1000 ms" in messages[1], messages[1]  # rank 0's own message, read by rank 1


def _corrupt(field: str, values: list[int]) -> str:
    rank = dist.get_rank()
    transport = _shm()
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    out = torch.empty_like(x)
    transport.all_to_all(out, x, [], [], "first")
    dist.barrier()
    if rank == 1:
        # Rank 1 writes the impossible value and stays out of the call, so
        # its own sends cannot overwrite it before rank 0 reads it.
        _C.shm_test_poke(transport, field, 0, values)
        dist.barrier()
    else:
        dist.barrier()
        with pytest.raises(dist.DistBackendError) as info:
            transport.all_to_all(out, x, [], [], "after the corruption")
        message = str(info.value)
    dist.barrier()
    if rank == 1:
        # Rank 0 marked the segment: rank 1's next call raises at once.
        with pytest.raises(dist.DistBackendError) as info:
            transport.all_to_all(out, x, [], [], "next")
        message = str(info.value)
    return message


@pytest.mark.parametrize(
    ("field", "values", "needle"),
    [
        ("posted", [1 << 62], "group rank 1 (global rank 1) wrote an impossible posted counter"),
        ("consumed", [1 << 62], "group rank 1 (global rank 1) wrote an impossible consumed counter"),
        ("header", [2, 1, 1 << 60, 0], "group rank 1 sends 1152921504606846976 bytes but this rank expects 256"),
        ("header", [2, 9, 256, 0], "group rank 1 sent a message header of kind 9"),
        ("header", [7, 1, 256, 0], "belongs to call 7 of this transport, but this rank is in call 2"),
    ],
    ids=["posted-ahead", "consumed-ahead", "header-length", "header-kind", "header-call"],
)
def test_impossible_values_from_a_peer_raise_naming_it(world_pools, field, values, needle):
    messages = world_pools.run(2, _corrupt, field, values, deadline_s=TIMEOUT_S)
    assert needle in messages[0], messages[0]
    # Rank 1 is then stopped by rank 0's abort, with rank 0's finding.
    assert "group rank 0 (global rank 0) failed" in messages[1] and needle in messages[1], messages[1]
