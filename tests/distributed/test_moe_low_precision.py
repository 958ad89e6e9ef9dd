"""MoE(dispatch_dtype=, combine_dtype=) against the same layer in fp32: the
output and the input gradient of every token within the bounds derived in
tests/harness/wire_bounds.py (linear experts, so the bounds are exact
inequalities, not tuned tolerances); the exchanged bytes; bad arguments."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

import alltoall
from alltoall.ops import wire
from tests.harness import wire_bounds

FP8 = torch.float8_e4m3fn
HIDDEN = 200  # one full block of 128 channels and a partial one of 72
WIRES = [(torch.bfloat16, None), (torch.bfloat16, torch.bfloat16), (FP8, None), (FP8, torch.bfloat16)]


def make_layer(drop: bool, k: int, dispatch_dtype, combine_dtype, groups=None, seed: int = 0) -> alltoall.MoE:
    torch.manual_seed(seed)  # the same gate on every rank and in both layers
    layer = alltoall.MoE(HIDDEN, nn.Linear(HIDDEN, HIDDEN), num_experts=8, k=k, drop_tokens=drop,
                         capacity_factor=1.0, min_capacity=1, normalize_weights=False, groups=groups,
                         dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    # Distinct experts, reproducible from their global index.
    for e, expert in zip(layer.experts.global_indices, layer.experts.experts, strict=True):
        g = torch.Generator().manual_seed(1000 + e)
        with torch.no_grad():
            expert.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
            expert.bias.copy_(torch.randn(HIDDEN, generator=g) * 0.1)
    return layer


def tokens_and_grad(rank: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + seed)
    # Tokens of different magnitudes, with outliers, so blocks get different scales.
    x = torch.randn(tokens, HIDDEN, generator=g) * torch.logspace(-1, 1, tokens).unsqueeze(1)
    x[:, 7] *= 20
    return x, torch.randn(tokens, HIDDEN, generator=g)


def run(layer: alltoall.MoE, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y, _, _ = layer(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def global_norms(layer: alltoall.MoE) -> tuple[float, float]:
    sigma, beta = wire_bounds.linear_norms(list(layer.experts.experts))
    if dist.is_initialized():
        t = torch.tensor([sigma, beta], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sigma, beta = t.tolist()
    return sigma, beta


def check_layer(drop: bool, k: int, dispatch_dtype, combine_dtype, tokens: int, seed: int, groups=None) -> float:
    """Returns the largest ratio of an error to its bound (<= 1 asserted)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if groups is not None:  # the tokens are replicated across each TP group
        rank = groups.ep_rank + 100 * groups.dp_rank
    reference = make_layer(drop, k, None, None, groups, seed=seed)
    low = make_layer(drop, k, dispatch_dtype, combine_dtype, groups, seed=seed)
    x, g = tokens_and_grad(rank, tokens, seed)
    y_ref, dx_ref = run(reference, x, g)
    y, dx = run(low, x, g)
    assert y.dtype == torch.float32 and dx.dtype == torch.float32
    sigma, beta = global_norms(reference)
    gate = float(torch.linalg.matrix_norm(reference.gate.wg.weight.detach().double(), ord=2))
    out_bound, grad_bound = wire_bounds.bounds(x, g, sigma, beta, gate, k, dispatch_dtype, combine_dtype)
    out_err = (y.double() - y_ref.double()).norm(dim=1)
    grad_err = (dx.double() - dx_ref.double()).norm(dim=1)
    what = f"drop={drop} k={k} dispatch={dispatch_dtype} combine={combine_dtype}"
    assert (out_err <= out_bound).all(), f"{what}: output error {float((out_err / out_bound).max()):.3f} x bound"
    assert (grad_err <= grad_bound).all(), f"{what}: gradient error {float((grad_err / grad_bound).max()):.3f} x bound"
    # The rounding really happened: a low-precision layer is not the fp32 one.
    assert out_err.max() > 0
    return max(float((out_err / out_bound).max()), float((grad_err / grad_bound).max()))


CASES = list(itertools.product([True, False], [1, 2], WIRES))


@pytest.mark.parametrize("drop", [True, False])
def test_single_process_layer_within_bounds(drop):
    for d, c in WIRES:
        check_layer(drop, 2, d, c, tokens=40, seed=3)


def _layer_within_bounds(local_size: int) -> int:
    alltoall.Communicator(local_size=local_size)  # so "auto" can see the emulated nodes
    checked = 0
    for seed, (drop, k, (d, c)) in enumerate(CASES):
        check_layer(drop, k, d, c, tokens=24, seed=seed)
        checked += 1
    return checked


@pytest.mark.parametrize("world,local_size", [(2, 1), (4, 2)])
def test_layer_within_bounds(worlds, world, local_size):
    assert worlds.run(world, _layer_within_bounds, local_size, deadline_s=300) == [len(CASES)] * world


def _tensor_parallel_within_bounds(tp: int, ep: int, local_size: int) -> int:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size)
    checked = 0
    for seed, (drop, k, (d, c)) in enumerate(CASES):
        if k == 1:
            continue
        check_layer(drop, k, d, c, tokens=16, seed=seed, groups=groups)
        checked += 1
    return checked


def test_tensor_parallel_layer_within_bounds(worlds):
    assert worlds.run(4, _tensor_parallel_within_bounds, 2, 2, 2, deadline_s=300) == [len(CASES) // 2] * 4


def bytes_sent(layer: alltoall.MoE) -> int:
    """Payload bytes this rank has sent to other ranks through the layer's
    Communicator (the executors' counters)."""
    return sum(b for ex in layer.exchange.comm._exchangers.values() for _, b in ex.traffic())


def _bytes_of_a_step() -> None:
    p = dist.get_world_size()
    for d, c in [(None, None), *WIRES]:
        layer = make_layer(True, 2, d, c)
        x, g = tokens_and_grad(dist.get_rank(), 16, 0)
        # The padded buffer: E * C rows, of which (p - 1) / p go to other ranks, each way.
        rows = 8 * layer.capacity(16) * (p - 1) // p
        x = x.clone().requires_grad_()
        before = bytes_sent(layer)
        y, _, _ = layer(x)
        forward = bytes_sent(layer) - before
        (y * g).sum().backward()
        backward = bytes_sent(layer) - before - forward
        assert forward == rows * (wire.row_bytes(HIDDEN, torch.float32, d) + wire.row_bytes(HIDDEN, torch.float32, c))
        # Gradients travel in combine_dtype both ways.
        assert backward == 2 * rows * wire.row_bytes(HIDDEN, torch.float32, c), (d, c, backward)
        fp32 = rows * HIDDEN * 4
        if d == FP8:  # 200 fp8 bytes and 2 scales of 4 bytes per row: 1/4 of fp32 plus 8 bytes a row
            assert rows * wire.row_bytes(HIDDEN, torch.float32, d) == fp32 // 4 + rows * 8
        if c == torch.bfloat16:
            assert rows * wire.row_bytes(HIDDEN, torch.float32, c) == fp32 // 2


def test_exchanged_bytes(worlds):
    worlds.run(2, _bytes_of_a_step)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"MoE: dispatch_dtype=float16 is not supported"):
        make_layer(True, 1, torch.float16, None)
    with pytest.raises(ValueError, match=r"MoE: combine_dtype=float8_e4m3fn is not supported; use one of None, "
                                         r"torch.bfloat16"):
        make_layer(True, 1, None, FP8)
    with pytest.raises(ValueError, match=r"overlap_degree=2 with dispatch_dtype=torch.bfloat16"):
        alltoall.MoE(HIDDEN, nn.Linear(HIDDEN, HIDDEN), num_experts=2, dispatch_dtype=torch.bfloat16,
                     overlap_degree=2)
