"""The shared-memory transport against gloo's all_to_all_single and
all_gather, at the transport layer: chunking through small rings, single
copies, random split matrices, zero rows, back-to-back calls of different
sizes, concurrent groups, mismatched splits, and the transport choice."""

from __future__ import annotations

import os
import random
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.topology import detect_hosts
from alltoall.transport import GroupRef, make_transport
from tests.harness.checks import assert_same_bytes, rank_input

SMALL_RING = {"ALLTOALL_SHM_RING_BYTES": "256"}
TIMEOUT = timedelta(seconds=60)


def _shm(group: dist.ProcessGroup | None = None):
    ref = GroupRef.of(group)
    transport = make_transport(ref, detect_hosts(ref.group), "shm", TIMEOUT)
    assert transport.kind == "shm"
    return transport


def _random_splits(p: int, seed: int, max_rows: int) -> list[list[int]]:
    """splits[s][d]: rows rank s sends rank d, the same on every rank; about
    a quarter are zero and some ranks send nothing at all."""
    rng = random.Random(seed)
    silent = rng.randrange(p) if p > 2 else -1
    return [[0 if s == silent or rng.random() < 0.25 else rng.randrange(max_rows + 1) for _ in range(p)]
            for s in range(p)]


def _reference(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits)
    return out


def _random_exchanges(calls: int, seed: int) -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    transport = _shm()
    checked = 0
    for call in range(calls):
        splits = _random_splits(p, seed * 1000 + call, max_rows=[0, 1, 5, 300][call % 4])
        ins = splits[rank]
        outs = [splits[s][rank] for s in range(p)]
        row_bytes = [1, 3, 8, 133][call % 4]  # odd row sizes: nothing lines up with a chunk
        x = rank_input(rank, sum(ins), (row_bytes,), torch.uint8, seed + call)
        out = x.new_empty((sum(outs), row_bytes))
        transport.all_to_all(out, x, outs, ins, f"call {call}")
        assert_same_bytes(out, _reference(x, outs, ins), f"call {call} splits {splits}")
        checked += 1
    return checked


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize(
    "env",
    [
        {},
        SMALL_RING,
        {**SMALL_RING, "ALLTOALL_SHM_SINGLE_COPY_BYTES": "0"},
        {"ALLTOALL_SHM_SINGLE_COPY_BYTES": "100"},
        {"ALLTOALL_SHM_SPINS": "0", "ALLTOALL_SHM_YIELDS": "0"},
    ],
    ids=["defaults", "ring-256", "ring-256-no-single-copy", "single-copy-100", "sleep-at-once"],
)
def test_random_split_matrices_match_gloo(world_pools, world, env):
    assert world_pools.run(world, _random_exchanges, 24, world, env=env) == [24] * world


def _back_to_back(calls: int, lag_rank: int) -> int:
    """Calls with nothing between them: alternating tiny and ring-filling
    messages, so a sender is often a call ahead of a receiver and sleepers
    wait for several peers at once; one rank lags now and then, so its peers
    fall asleep. The references run afterwards, from the kept inputs."""
    rank, p = dist.get_rank(), dist.get_world_size()
    transport = _shm()
    kept = []
    for call in range(calls):
        rows = [1, 200, 0, 3, 64][call % 5]
        x = rank_input(rank, p * rows, (13,), torch.uint8, call)
        out = torch.empty_like(x)
        if rank == lag_rank and call % 7 == 3:
            time.sleep(0.005)
        transport.all_to_all(out, x, [], [], f"call {call}")
        kept.append((x, out))
    for call, (x, out) in enumerate(kept):
        split = [len(x) // p] * p
        assert_same_bytes(out, _reference(x, split, split), f"call {call}")
    return calls


@pytest.mark.parametrize(
    "env",
    [SMALL_RING, {**SMALL_RING, "ALLTOALL_SHM_SPINS": "0", "ALLTOALL_SHM_YIELDS": "0"}, {}],
    ids=["ring-256", "ring-256-sleep-at-once", "defaults"],
)
def test_back_to_back_calls_with_a_lagging_rank_match_gloo(world_pools, env):
    assert world_pools.run(8, _back_to_back, 40, 5, env=env) == [40] * 8


def _all_gather(rows: int) -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    transport = _shm()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool):
        x = rank_input(rank, rows, (5,), dtype, rows)
        out = x.new_empty((p * rows, 5))
        transport.all_gather(out, x, "all_gather")
        expected = x.new_empty((p * rows, 5))
        dist.all_gather_into_tensor(expected, x)
        assert_same_bytes(out, expected, f"all_gather {dtype} rows={rows}")


@pytest.mark.parametrize("rows", [0, 1, 700])
def test_all_gather_matches_gloo(world_pools, rows):
    world_pools.run(4, _all_gather, rows, env=SMALL_RING)


def _two_groups_at_once(calls: int) -> int:
    rank = dist.get_rank()
    halves = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
    mine = halves[rank // 4]
    transport, world = _shm(mine), _shm()
    for call in range(calls):
        # Each half exchanges on its own segment while the other does too,
        # and the world's segment interleaves with both.
        x = rank_input(rank, 4 * (call % 5), (17,), torch.float32, call)
        out = torch.empty_like(x)
        transport.all_to_all(out, x, [], [], "half")
        expected = torch.empty_like(x)
        dist.all_to_all_single(expected, x, group=mine)
        assert_same_bytes(out, expected, f"half, call {call}")
        if call % 3 == 0:
            y = rank_input(rank, 8 * (call % 4), (3,), torch.int64, call)
            out_y = torch.empty_like(y)
            world.all_to_all(out_y, y, [], [], "world")
            assert_same_bytes(out_y, _reference(y, [len(y) // 8] * 8, [len(y) // 8] * 8), f"world, call {call}")
    return calls


def test_two_groups_exchange_concurrently_without_cross_talk(world_pools):
    assert world_pools.run(8, _two_groups_at_once, 30, env=SMALL_RING) == [30] * 8


def _mismatched_splits() -> str:
    rank = dist.get_rank()
    comm = alltoall.Communicator(transport="shm", timeout=5)
    x = torch.arange(8, dtype=torch.float32)
    # Rank 1 expects 3 rows from rank 0, which sends 2.
    outs = [3, 2, 2, 2] if rank == 1 else [2, 2, 2, 2]
    try:
        comm.all_to_all_v(x, [2, 2, 2, 2], outs, "flat")
    except RuntimeError as error:
        return str(error)
    return "completed"


def test_mismatched_splits_raise_instead_of_corrupting(world_pools):
    messages = world_pools.run(4, _mismatched_splits)
    assert "group rank 0 sends 8 bytes but this rank expects 12 (the ranks' splits disagree)" in messages[1]
    assert "flat all_to_all_v phase 1/1" in messages[1]
    # The others either finished (their messages were delivered before rank 1
    # looked), or raised: at once, because rank 1 set the segment's abort word
    # with its reason, or (if they missed the word) on the timeout or on rank
    # 1 leaving. Never a wrong result.
    forwarded = "the shared-memory segment was aborted: group rank 1 (global rank 1) failed: " + (
        "group rank 0 sends 8 bytes but this rank expects 12 (the ranks' splits disagree)"
    )
    for message in messages[:1] + messages[2:]:
        assert (
            message == "completed"
            or forwarded in message
            or "timed out" in message
            or "(global rank(s) [1]) left" in message
        ), message


def _fake_hosts(hosts: list[str], transport: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    os.environ["ALLTOALL_HOSTNAME"] = hosts[dist.get_rank()]
    try:
        comm = alltoall.Communicator(transport=transport)
        return comm.transports("flat"), comm.transports("hierarchical")
    finally:
        del os.environ["ALLTOALL_HOSTNAME"]


def test_auto_uses_shared_memory_inside_hosts_and_c10d_between(world_pools):
    flat, hierarchical = zip(*world_pools.run(4, _fake_hosts, ["a", "a", "b", "b"], "auto"), strict=True)
    assert set(flat) == {("c10d:gloo",)}
    assert set(hierarchical) == {("shm", "c10d:gloo")}


def test_auto_uses_shared_memory_for_every_phase_on_one_host(world_pools):
    results = world_pools.run(4, _fake_hosts, ["a"] * 4, "auto")
    assert set(results) == {(("shm",), ("shm",))}


def _shm_across_hosts() -> str:
    try:
        _fake_hosts(["a", "a", "b", "b"], "shm")
    except ValueError as error:
        return str(error)
    return "no error"


def test_shm_on_a_group_spanning_hosts_is_a_value_error(world_pools):
    for message in world_pools.run(4, _shm_across_hosts):
        assert "transport='shm' needs every member of group" in message
        assert "on one host, but they run on a, b" in message


def _bad_transport_name() -> str:
    with pytest.raises(ValueError, match=r"transport='tcp' is not one of auto, shm, c10d"):
        alltoall.Communicator(transport="tcp")
    os.environ["ALLTOALL_TRANSPORT"] = "nvlink"
    try:
        with pytest.raises(ValueError, match=r"ALLTOALL_TRANSPORT='nvlink' is not one of auto, shm, c10d"):
            alltoall.Communicator()
    finally:
        del os.environ["ALLTOALL_TRANSPORT"]
    return "ok"


def test_unknown_transport_names_raise_before_communicating(world_pools):
    assert world_pools.run(2, _bad_transport_name) == ["ok", "ok"]


def _parallel_groups_transports() -> tuple[str, tuple[str, ...]]:
    groups = alltoall.ParallelGroups(tp=2, local_size=4)
    return groups.tp_transport.kind, groups.ep_comm.transports("hierarchical")


def test_parallel_groups_use_the_same_choice(world_pools):
    results = world_pools.run(8, _parallel_groups_transports)
    assert set(results) == {("shm", ("shm", "shm"))}
