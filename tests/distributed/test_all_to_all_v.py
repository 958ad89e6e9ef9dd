"""Uneven all-to-all (all-to-all-v): differential against
dist.all_to_all_single with split sizes, edge cases, autograd, property-based
split matrices, and the collective argument check."""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alltoall
from tests.harness.checks import assert_same_bytes, rank_input

WORLDS = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4)]
CASES = [(torch.float32, (3,)), (torch.bfloat16, ()), (torch.int64, (2, 2)), (torch.bool, (5,)),
         (torch.float16, (1,))]


def split_matrix(kind: str, p: int, seed: int) -> list[list[int]]:
    """m[s][d] = rows rank s sends to rank d; the same on every rank."""
    rng = random.Random(seed)
    if kind == "random":
        return [[rng.randint(0, 6) for _ in range(p)] for _ in range(p)]
    if kind == "zero_heavy":
        return [[rng.randint(1, 4) if rng.random() < 0.2 else 0 for _ in range(p)] for _ in range(p)]
    if kind == "skewed":  # one peer receives about 90% of every rank's rows
        hot = rng.randrange(p)
        return [[45 if d == hot else rng.randint(0, 1) for d in range(p)] for _ in range(p)]
    if kind == "silent_rank":  # rank 0 sends nothing, rank p-1 receives nothing
        m = [[rng.randint(1, 3) for _ in range(p)] for _ in range(p)]
        m[0] = [0] * p
        for row in m:
            row[p - 1] = 0
        return m
    if kind == "empty":
        return [[0] * p for _ in range(p)]
    raise ValueError(kind)


def reference(x: torch.Tensor, ins: list[int], outs: list[int]) -> torch.Tensor:
    out = torch.empty((sum(outs), *x.shape[1:]), dtype=x.dtype)
    dist.all_to_all_single(out, x, outs, ins)
    return out


def _matches_torch(local_size: int, seed: int) -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    checked = 0
    for k, kind in enumerate(("random", "zero_heavy", "skewed", "silent_rank", "empty")):
        m = split_matrix(kind, p, seed * 31 + k)
        ins, outs = m[rank], [m[s][rank] for s in range(p)]
        for dtype, trailing in CASES:
            x = rank_input(rank, sum(ins), trailing, dtype, seed + k)
            expected = reference(x, ins, outs)
            for algorithm in ("flat", "hierarchical", "auto"):
                what = f"{kind} {algorithm} {dtype} {trailing}"
                assert_same_bytes(comm.all_to_all_v(x, ins, outs, algorithm), expected, what)
                out, received = comm.all_to_all_v(x, torch.tensor(ins), None, algorithm)
                assert_same_bytes(out, expected, what + " (counts exchanged)")
                assert received == outs, f"{what}: output splits {received} != {outs}"
                checked += 1
            out, received = alltoall.all_to_all_v(x, ins)
            assert_same_bytes(out, expected, f"module-level {kind}")
            assert received == outs
    return checked


@pytest.mark.parametrize("world,local_size", WORLDS)
def test_matches_all_to_all_single(worlds, world, local_size):
    checked = worlds.run(world, _matches_torch, local_size, seed=world * 10 + local_size)
    assert checked == [5 * len(CASES) * 3] * world


def _interleaved_nodes() -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(topology=alltoall.Topology.from_node_ids([0, 1] * (p // 2), rank))
    m = split_matrix("random", p, 5)
    ins, outs = m[rank], [m[s][rank] for s in range(p)]
    x = rank_input(rank, sum(ins), (3,), torch.float32)
    out, received = comm.all_to_all_v(x, ins, algorithm="hierarchical")
    assert_same_bytes(out, reference(x, ins, outs), "cyclic placement")
    assert received == outs


def test_hierarchical_v_on_cyclic_placement(worlds):
    worlds.run(8, _interleaved_nodes)


def _backward(local_size: int) -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    m = split_matrix("random", p, 11)
    ins, outs = m[rank], [m[s][rank] for s in range(p)]
    x0 = rank_input(rank, sum(ins), (3,), torch.float64, seed=1)
    weight = rank_input(rank, sum(outs), (3,), torch.float64, seed=2)
    x_ref = x0.clone().requires_grad_()
    out_ref = dist_fn.all_to_all_single(torch.empty(sum(outs), 3, dtype=torch.float64), x_ref, outs, ins)
    (out_ref * weight).sum().backward()
    for algorithm in ("flat", "hierarchical"):
        for given_splits in (outs, None):
            x = x0.clone().requires_grad_()
            result = comm.all_to_all_v(x, ins, given_splits, algorithm)
            out = result if given_splits is not None else result[0]
            (out * weight).sum().backward()
            assert torch.equal(x.grad, x_ref.grad), f"{algorithm}, output splits given: {given_splits is not None}"


@pytest.mark.parametrize("world,local_size", [(2, 1), (4, 2), (8, 4)])
def test_backward_swaps_the_splits(worlds, world, local_size):
    worlds.run(world, _backward, local_size)


def _property(matrix: list[list[int]], trailing: tuple[int, ...], dtype_name: str) -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, dtype_name)
    comm = alltoall.Communicator(local_size=2)
    ins, outs = matrix[rank], [matrix[s][rank] for s in range(p)]
    x = rank_input(rank, sum(ins), trailing, dtype, seed=sum(map(sum, matrix)))
    expected = reference(x, ins, outs)
    for algorithm in ("flat", "hierarchical"):
        out, received = comm.all_to_all_v(x, ins, algorithm=algorithm)
        assert_same_bytes(out, expected, algorithm)
        assert received == outs


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    matrix=st.lists(st.lists(st.integers(0, 5), min_size=4, max_size=4), min_size=4, max_size=4),
    trailing=st.sampled_from([(), (1,), (3,), (2, 3)]),
    dtype_name=st.sampled_from(["float32", "float16", "int64", "bool"]),
)
def test_property_any_split_matrix(worlds, matrix, trailing, dtype_name):
    worlds.run(4, _property, matrix, trailing, dtype_name)


# The collective check ---------------------------------------------------------

def _mismatch(case: str, use_env: bool) -> str:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2, timeout=20)
    m = split_matrix("random", p, 3)
    ins, outs = list(m[rank]), [m[s][rank] for s in range(p)]
    dtype, trailing = torch.float32, (2,)
    if case == "splits" and rank == 1:
        ins[0] += 2  # rank 0 still expects the old count from rank 1
    if case == "dtype" and rank == 2:
        dtype = torch.float16
    if case == "shape" and rank == 3:
        trailing = (3,)
    if case == "local" and rank == 2:
        outs = outs[:-1]  # a rank whose own arguments are invalid
    x = rank_input(rank, sum(ins), trailing, dtype)
    with pytest.raises(ValueError) as info:
        if use_env:
            comm.all_to_all_v(x, ins, outs, "hierarchical")
        else:
            comm.all_to_all_v(x, ins, outs, "hierarchical", check=True)
    return str(info.value)


@pytest.mark.parametrize("case,needle", [
    ("splits", r"rank 1 sends \d+ rows to rank 0, which expects \d+"),
    ("dtype", re.escape("rank 2 passes torch.float16 rows of shape (2,) but rank 0 passes torch.float32")),
    ("shape", re.escape("rank 3 passes torch.float32 rows of shape (3,) but rank 0 passes torch.float32 rows of "
                        "shape (2,)")),
    ("local", re.escape("rank 2: all_to_all_v: output_splits has 3 entries but the group has 4 ranks")),
])
@pytest.mark.parametrize("use_env", [False, True], ids=["check=True", "ALLTOALL_CHECK=1"])
def test_check_raises_the_same_error_on_every_rank(worlds, case, needle, use_env):
    env = {"ALLTOALL_CHECK": "1"} if use_env else {}
    messages = worlds.run(4, _mismatch, case, use_env, env=env, deadline_s=60)
    assert len(set(messages)) == 1, f"ranks raised different errors: {messages}"
    assert re.search(needle, messages[0]), messages[0]
    assert "disagree (check=True)" in messages[0]


def _check_passes_when_consistent() -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    m = split_matrix("skewed", p, 9)
    ins, outs = m[rank], [m[s][rank] for s in range(p)]
    x = rank_input(rank, sum(ins), (2,), torch.float32)
    for algorithm in ("flat", "hierarchical"):
        assert_same_bytes(comm.all_to_all_v(x, ins, outs, algorithm, check=True), reference(x, ins, outs))
    y = rank_input(rank, 2 * p, (2,), torch.float32)
    expected = torch.empty_like(y)
    dist.all_to_all_single(expected, y)
    assert_same_bytes(comm.all_to_all(y, "hierarchical", check=True), expected)


def test_check_passes_consistent_arguments(worlds):
    worlds.run(4, _check_passes_when_consistent)


def _equal_split_size_mismatch() -> str:
    rank = dist.get_rank()
    comm = alltoall.Communicator()
    x = torch.zeros(8 if rank else 4, 2)
    with pytest.raises(ValueError) as info:
        comm.all_to_all(x, check=True)
    return str(info.value)


def test_check_catches_equal_split_size_mismatch(worlds):
    messages = worlds.run(4, _equal_split_size_mismatch, deadline_s=60)
    assert len(set(messages)) == 1
    assert "dim 0 differs across ranks ([4, 8, 8, 8])" in messages[0]


def _one_wrong_sender(sender: int, algorithm: str) -> str:
    rank, p = dist.get_rank(), dist.get_world_size()
    sender = sender % p
    receiver = (sender + 1) % p
    comm = alltoall.Communicator(local_size=2, timeout=20)
    m = split_matrix("random", p, 5)
    ins, outs = list(m[rank]), [m[s][rank] for s in range(p)]
    if rank == sender:
        ins[receiver] += 1  # the receiver still expects the old count
    x = rank_input(rank, sum(ins), (2,), torch.float32)
    with pytest.raises(ValueError) as info:
        comm.all_to_all_v(x, ins, outs, algorithm, check=True)
    return str(info.value)


# The first and the last rank as the only wrong sender: a check that skipped
# either end of the group (rank 0's row of the split matrix, or the last
# rank's) would pass every other case.
@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
@pytest.mark.parametrize("sender", [0, -1], ids=["rank0", "last-rank"])
def test_check_catches_a_single_wrong_sender_at_either_end(worlds, sender, algorithm):
    messages = worlds.run(4, _one_wrong_sender, sender, algorithm, deadline_s=60)
    assert len(set(messages)) == 1, f"ranks raised different errors: {messages}"
    s = sender % 4
    assert re.search(rf"rank {s} sends \d+ rows to rank {(s + 1) % 4}, which expects \d+", messages[0]), messages[0]
    assert messages[0].count(" sends ") == 1, messages[0]
