"""The "alltoall" torch.distributed backend against plain gloo, in the same
run: every rank creates an alltoall group over the world (the pool's default
group is gloo) and compares what torch.distributed's all-to-all calls give
on both, bit for bit, for every algorithm, both transports, equal and uneven
splits, zero splits and empty tensors; then async_op, autograd, the
functional collectives (compiled too) and the per-group counters."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional as dist_fn

import alltoall
from tests.distributed.test_all_to_all_v import split_matrix
from tests.harness.checks import assert_same_bytes, rank_input

CASES = [(torch.float32, (3,)), (torch.bfloat16, ()), (torch.int64, (2, 2)), (torch.bool, (5,)),
         (torch.float16, (1,)), (torch.complex64, (2,))]
# (world size, emulated ranks per node)
WORLDS = [(4, 2), (8, 4)]


def _gloo(x: torch.Tensor, outs: list[int] | None = None, ins: list[int] | None = None) -> torch.Tensor:
    out = x.new_empty((sum(outs), *x.shape[1:])) if outs is not None else torch.empty_like(x)
    dist.all_to_all_single(out, x, outs, ins)
    return out


def _equal_splits(seed: int) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="alltoall")
    calls = 0
    for k, (dtype, trailing) in enumerate(CASES):
        for rows_per_peer in (0, 1, 5):
            x = rank_input(rank, rows_per_peer * p, trailing, dtype, seed + k)
            out = torch.empty_like(x)
            work = dist.all_to_all_single(out, x, group=group)
            assert work is None
            assert_same_bytes(out, _gloo(x), f"{dtype} {trailing} x{rows_per_peer}")
            calls += 1
    # A non-contiguous output, and the input itself as the output.
    x = rank_input(rank, 4 * p, (6,), torch.float32, seed)
    out = torch.empty(6, 4 * p).t()
    dist.all_to_all_single(out, x, group=group)
    assert_same_bytes(out.contiguous(), _gloo(x), "non-contiguous output")
    in_place = x.clone()
    dist.all_to_all_single(in_place, in_place, group=group)
    assert_same_bytes(in_place, _gloo(x), "output aliasing the input")
    return {"calls": calls + 2, "stats": alltoall.backend_stats(group)}


def _uneven_splits(seed: int) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="alltoall")
    calls = 0
    for k, kind in enumerate(("random", "zero_heavy", "skewed", "silent_rank", "empty")):
        m = split_matrix(kind, p, seed * 31 + k)
        ins, outs = m[rank], [m[s][rank] for s in range(p)]
        for dtype, trailing in CASES[:4]:
            x = rank_input(rank, sum(ins), trailing, dtype, seed + k)
            out = x.new_empty((sum(outs), *trailing))
            dist.all_to_all_single(out, x, outs, ins, group=group)
            assert_same_bytes(out, _gloo(x, outs, ins), f"{kind} {dtype}")
            calls += 1
    # One side given, the other empty (equal shares of dim 0).
    x = rank_input(rank, 2 * p, (3,), torch.float32, seed)
    ins = [2] * p
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, [], ins, group=group)
    assert_same_bytes(out, _gloo(x, [2] * p, ins), "equal output, explicit input splits")
    return {"calls": calls + 1, "stats": alltoall.backend_stats(group)}


def _transport_kind(transport: str) -> str:
    return "shm" if transport == "shm" else "c10d:gloo"


@pytest.mark.parametrize("world,local", WORLDS)
@pytest.mark.parametrize("algorithm", ["hierarchical", "flat", "auto"])
def test_equal_splits_match_gloo(worlds, world, local, algorithm):
    env = {"ALLTOALL_LOCAL_SIZE": str(local), "ALLTOALL_ALGORITHM": algorithm}
    for result in worlds.run(world, _equal_splits, 3, env=env):
        stats = result["stats"]
        # Emulated nodes: "auto" is flat (alltoall.ops.selection).
        ran = "hierarchical" if algorithm == "hierarchical" else "flat"
        assert stats["algorithms"][ran]["calls"] == result["calls"]
        assert sorted(stats["algorithms"]) == (["flat", "hierarchical"] if ran == "hierarchical" else ["flat"])
        phases = stats["algorithms"][ran]["phases"]
        roles = [ph["role"] for ph in phases]
        assert roles == (["intra_node", "inter_node"] if ran == "hierarchical" else ["world"])
        assert {ph["transport"] for ph in phases} == {_transport_kind(worlds.transport)}
        assert all(ph["calls"] == result["calls"] and ph["bytes"] > 0 for ph in phases)


@pytest.mark.parametrize("world,local", WORLDS)
@pytest.mark.parametrize("algorithm", ["hierarchical", "flat"])
def test_uneven_splits_match_gloo(worlds, world, local, algorithm):
    env = {"ALLTOALL_LOCAL_SIZE": str(local), "ALLTOALL_ALGORITHM": algorithm}
    for result in worlds.run(world, _uneven_splits, 5, env=env):
        assert result["stats"]["algorithms"][algorithm]["calls"] == result["calls"]


def _tensor_lists(seed: int) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="alltoall")
    # Tensor j goes to rank j: its shape depends on both ends, some are empty.
    def piece(src: int, dst: int) -> torch.Tensor:
        return rank_input(src, (src + 2 * dst) % 3, (2,), torch.float64, seed * 100 + dst)

    inputs = [piece(rank, d) for d in range(p)]
    outputs = [torch.full_like(piece(s, rank), -1.0) for s in range(p)]
    dist.all_to_all(outputs, inputs, group=group)
    for s in range(p):
        assert_same_bytes(outputs[s], piece(s, rank), f"tensor from rank {s}")
    return alltoall.backend_stats(group)


def test_tensor_lists(worlds):
    env = {"ALLTOALL_LOCAL_SIZE": "2", "ALLTOALL_ALGORITHM": "hierarchical"}
    for stats in worlds.run(4, _tensor_lists, 1, env=env):
        assert stats["algorithms"]["hierarchical"]["calls"] == 1


def _async_autograd_functional(compile_backend: str) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="alltoall")
    x = rank_input(rank, 3 * p, (4,), torch.float32, 7)
    expected = _gloo(x)

    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x, group=group, async_op=True)
    assert work.wait() and work.is_completed() and work.is_success()
    assert_same_bytes(out, expected, "async_op")
    assert_same_bytes(work.get_future().wait()[0], expected, "the Work's future")

    # Autograd: the backward is an all-to-all through the same group.
    weights = rank_input(rank, 3 * p, (4,), torch.float32, 8)
    grads = []
    for g in (group, None):
        leaf = x.clone().requires_grad_()
        y = dist_fn.all_to_all_single(torch.empty_like(x), leaf, group=g)
        (y * weights).sum().backward()
        grads.append(leaf.grad)
    assert_same_bytes(grads[0], grads[1], "gradient")

    # Functional collectives: what torch.compile emits, eager and compiled.
    assert_same_bytes(funcol.wait_tensor(funcol.all_to_all_single(x, None, None, group)), expected, "functional")
    ins = [(rank + d) % 3 for d in range(p)]
    outs = [(s + rank) % 3 for s in range(p)]
    xv = rank_input(rank, sum(ins), (2,), torch.float32, 9)
    assert_same_bytes(funcol.wait_tensor(funcol.all_to_all_single(xv, outs, ins, group)), _gloo(xv, outs, ins),
                      "functional, uneven")

    def f(t: torch.Tensor) -> torch.Tensor:
        return funcol.all_to_all_single(t * 2, None, None, group).sin()

    before = alltoall.backend_stats(group)["algorithms"]["hierarchical"]["calls"]
    compiled = torch.compile(f, backend=compile_backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), (_gloo(x * 2)).sin(), rtol=0, atol=0)
    after = alltoall.backend_stats(group)["algorithms"]["hierarchical"]["calls"]
    assert after > before, "the compiled graph's all-to-all did not reach the alltoall backend"
    return alltoall.backend_stats(group)


# aot_eager: the graph torch.compile captures (Dynamo, AOTAutograd) with the
# functional all-to-all in it, run without Inductor's code generation, whose
# C++ compile on 4 loaded ranks would cost CI more than it checks here (and
# whose fused sin differs from eager's in the last bit).
@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_async_autograd_and_functional_collectives(world_pools, compile_backend):
    env = {"ALLTOALL_LOCAL_SIZE": "2", "ALLTOALL_ALGORITHM": "hierarchical"}
    for stats in world_pools.run(4, _async_autograd_functional, compile_backend, env=env, deadline_s=400):
        # async, 2 for autograd (forward and backward), 2 functional, >= 1 compiled
        assert stats["algorithms"]["hierarchical"]["calls"] >= 6
        assert stats["algorithms"]["flat"]["calls"] == 0
