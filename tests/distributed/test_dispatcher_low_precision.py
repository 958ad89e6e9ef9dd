"""ExpertDispatcher(dispatch_dtype=, combine_dtype=) against the fp32
dispatcher: outputs and gradients of every token within the bounds derived
in tests/harness/wire_bounds.py (linear experts), dedup and replicate (flat
and hierarchical), drop and dropless, on emulated 2 x 2 nodes and both
transports; and the exact bytes in the dispatcher's counters."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.ops import wire
from tests.harness import wire_bounds

FP8 = torch.float8_e4m3fn
HIDDEN = 200
EXPERTS = 8
K = 2
WIRES = [(torch.bfloat16, None), (torch.bfloat16, torch.bfloat16), (FP8, None), (FP8, torch.bfloat16)]
MODES = ["dedup", "replicate", "replicate-hierarchical"]


def expert_maps() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return (torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5,
            torch.randn(EXPERTS, HIDDEN, generator=g) * 0.1)


def inputs(rank: int, tokens: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, HIDDEN, generator=g) * torch.logspace(-1, 1, tokens).unsqueeze(1)
    x[:, 7] *= 20  # an outlier channel, so block 0's scale is set by it
    index = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(tokens)])
    w = torch.rand(tokens, K, generator=g)
    w = w / w.sum(dim=1, keepdim=True)  # sum_j w_sj <= 1, as for gate probabilities
    return x, index, w, torch.randn(tokens, HIDDEN, generator=g)


def step(dispatcher, x, index, w, capacity, probe, maps, biases):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    recv, handle = dispatcher.dispatch(x, index, w, capacity)
    first = dispatcher.coordinate * dispatcher.num_local_experts
    rows = [piece @ maps[first + i].T + biases[first + i] for i, piece in enumerate(recv.split(handle.counts_list))]
    y = dispatcher.combine(torch.cat(rows), handle)
    (y * probe).sum().backward()
    return y.detach(), x.grad, w.grad, handle


def _within_bounds() -> int:
    rank = dist.get_rank()
    comm = alltoall.Communicator(local_size=2)
    maps, biases = expert_maps()
    sigma = max(float(torch.linalg.matrix_norm(m.double(), ord=2)) for m in maps)
    beta = float(biases.double().norm(dim=1).max())
    checked = 0
    for mode, capacity in itertools.product(MODES, [None, 3]):
        kind, algorithm = mode.split("-")[0], "hierarchical" if mode.endswith("hierarchical") else "flat"
        x, index, w, probe = inputs(rank, 24)
        reference = alltoall.ExpertDispatcher(comm, EXPERTS, mode=kind, algorithm=algorithm)
        y_ref, dx_ref, dw_ref, h_ref = step(reference, x, index, w, capacity, probe, maps, biases)
        for d, c in WIRES:
            low = alltoall.ExpertDispatcher(comm, EXPERTS, mode=kind, algorithm=algorithm, dispatch_dtype=d,
                                            combine_dtype=c)
            y, dx, dw, handle = step(low, x, index, w, capacity, probe, maps, biases)
            what = f"{mode} capacity={capacity} dispatch={d} combine={c}"
            # The dedup combine rounds partial sums at the destination and at the relay.
            hops = 2 if kind == "dedup" else 1
            out_bound, grad_bound = wire_bounds.bounds(x, probe, sigma, beta, 0.0, K, d, c, hops)
            out_err = (y.double() - y_ref.double()).norm(dim=1)
            grad_err = (dx.double() - dx_ref.double()).norm(dim=1)
            assert (out_err <= out_bound).all(), f"{what}: output {float((out_err / out_bound).max()):.3f} x bound"
            assert (grad_err <= grad_bound).all(), f"{what}: x grad {float((grad_err / grad_bound).max()):.3f} x bound"
            # dL/dw_sj = <G_s moved back (one rounding in combine_dtype), o_sj>, and o_sj moved by at
            # most sigma D_s: |error| <= ||G_s|| (u_c (sigma (||x_s|| + D_s) + beta) + (1 + u_c) sigma D_s).
            dd, uc = wire_bounds.dispatch_error(x, d), wire_bounds.unit(c)
            xn, gn = x.double().norm(dim=1), probe.double().norm(dim=1)
            w_bound = gn * (uc * (sigma * (xn + dd) + beta) + (1 + uc) * sigma * dd)
            w_bound = w_bound + wire_bounds.FLOAT32_SLACK * gn * (sigma * xn + beta)
            assert ((dw.double() - dw_ref.double()).abs() <= w_bound.unsqueeze(1)).all(), f"{what}: weight grad"
            assert out_err.max() > 0, f"{what}: nothing was rounded"
            check_counters(reference, low, x, d, c, kind, what)
            assert handle.sent["rows_inter"] == h_ref.sent["rows_inter"]
            checked += 1
    return checked


def check_counters(reference, low, x, d, c, kind: str, what: str) -> None:
    """The same rows as fp32; bytes of M + 4 ceil(M/128) (FP8) or 2M (bf16)
    per row instead of 4M, in each direction's format."""
    ref, got = reference.stats(), low.stats()
    width = {"dispatch": wire.row_bytes(HIDDEN, x.dtype, d), "combine": wire.row_bytes(HIDDEN, x.dtype, c),
             "dispatch_backward": wire.row_bytes(HIDDEN, x.dtype, c),
             "combine_backward": wire.row_bytes(HIDDEN, x.dtype, c)}
    for direction, where in itertools.product(width, ("intra", "inter")):
        rows = got[f"{direction}_rows_{where}"]
        assert rows == ref[f"{direction}_rows_{where}"], f"{what}: {direction} {where} rows"
        saved = (HIDDEN * 4 - width[direction]) * rows
        key = f"{direction}_bytes_{where}"
        assert got[key] == ref[key] - saved, f"{what}: {key} = {got[key]}, fp32 {ref[key]}"
    if d == FP8:
        assert width["dispatch"] == HIDDEN + 8  # 1/4 of fp32's 4M, plus two 4-byte scales
    if c == torch.bfloat16:
        assert width["combine"] * 2 == HIDDEN * 4


def test_dispatcher_within_bounds(worlds):
    assert worlds.run(4, _within_bounds, deadline_s=600) == [len(MODES) * 2 * len(WIRES)] * 4


def _tensor_parallel_within_bounds() -> int:
    groups = alltoall.ParallelGroups(2, local_size=2)  # tp 2 x ep 2 on 4 ranks
    maps, biases = expert_maps()
    sigma = max(float(torch.linalg.matrix_norm(m.double(), ord=2)) for m in maps)
    beta = float(biases.double().norm(dim=1).max())
    x, index, w, probe = inputs(1000 * groups.dp_rank + groups.ep_rank, 24)  # replicated over TP
    checked = 0
    for mode in ("dedup", "replicate"):
        reference = alltoall.ExpertDispatcher(groups, EXPERTS, mode=mode)
        y_ref, dx_ref, _, _ = step(reference, x, index, w, None, probe, maps, biases)
        for d, c in WIRES:
            low = alltoall.ExpertDispatcher(groups, EXPERTS, mode=mode, dispatch_dtype=d, combine_dtype=c)
            y, dx, _, _ = step(low, x, index, w, None, probe, maps, biases)
            hops = 2 if low.mode == "dedup" else 1
            out_bound, grad_bound = wire_bounds.bounds(x, probe, sigma, beta, 0.0, K, d, c, hops)
            assert ((y.double() - y_ref.double()).norm(dim=1) <= out_bound).all(), f"{mode} {d} {c}: output"
            assert ((dx.double() - dx_ref.double()).norm(dim=1) <= grad_bound).all(), f"{mode} {d} {c}: x grad"
            checked += 1
    return checked


def test_tensor_parallel_dispatcher_within_bounds(worlds):
    assert worlds.run(4, _tensor_parallel_within_bounds, deadline_s=600) == [2 * len(WIRES)] * 4


def test_bad_dtypes_raise(worlds):
    worlds.run(2, _bad_dtypes)


def _bad_dtypes() -> None:
    comm = alltoall.Communicator()
    with pytest.raises(ValueError, match=r"ExpertDispatcher: dispatch_dtype=float16 is not supported"):
        alltoall.ExpertDispatcher(comm, 4, dispatch_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"ExpertDispatcher: combine_dtype=float8_e4m3fn is not supported"):
        alltoall.ExpertDispatcher(comm, 4, combine_dtype=FP8)
