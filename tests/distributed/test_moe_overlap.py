"""MoE(..., overlap_degree=N): outputs and gradients against N = 1 and
against the dense single-process reference, for N in 1..4 (chunks with zero
rows included), drop and dropless, flat and hierarchical, ep and tp x ep."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

import alltoall
from alltoall.moe import MoE
from tests.harness.checks import assert_same_bytes, rank_input
from tests.harness.moe_checks import HIDDEN, check_against_reference, grads_of

FFN = 10
DEGREES = (1, 2, 3, 4)


class RowWise(nn.Module):
    """An expert that computes every row on its own (no reductions across
    rows, no BLAS blocking), so any chunking gives the same bits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale + self.shift)


def _step(layer: MoE, x: torch.Tensor, probe: torch.Tensor,
          input_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    x = x.clone().requires_grad_(input_grad)
    out, aux, _ = layer(x)
    assert out.requires_grad
    ((out * probe).sum() + 0.1 * aux).backward()
    return out.detach(), x.grad, grads_of(layer)


def _against_degree_one(make: Callable[[int], MoE], x: torch.Tensor, probe: torch.Tensor) -> int:
    """The layer ``make(N)`` builds (the same weights for every N) at every
    degree on the same input; compares with N=1, bit for bit where the
    experts are row-wise."""
    base = None
    for degree in DEGREES:
        result = _step(make(degree), x, probe)
        if base is None:
            base = result
            continue
        assert_same_bytes(result[0], base[0], f"N={degree} output")
        assert_same_bytes(result[1], base[1], f"N={degree} input grad")
        for name, grad in result[2].items():  # sums over rows: the order differs by chunking
            torch.testing.assert_close(grad, base[2][name], rtol=1e-10, atol=1e-12, msg=f"N={degree} {name}")
    # Input without grad (the first MoE of a model): as at N = 1, the
    # backward then has no return exchanges; parameter grads still match.
    plain = [_step(make(degree), x, probe, input_grad=False) for degree in (1, 3)]
    assert plain[0][1] is None and plain[1][1] is None
    assert_same_bytes(plain[1][0], plain[0][0], "N=3 output, input without grad")
    for name, grad in plain[1][2].items():
        torch.testing.assert_close(grad, plain[0][2][name], rtol=1e-10, atol=1e-12, msg=f"N=3 {name}, no input grad")
        torch.testing.assert_close(grad, base[2][name], rtol=1e-10, atol=1e-12, msg=f"N=3 {name} vs input grad")
    return len(DEGREES)


def _expert_parallel(local_size: int) -> int:
    world = dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    checked = 0
    for drop, k, algorithm in itertools.product([True, False], [1, 2], ["flat", "hierarchical"]):
        # Capacity needs equal token counts; dropless takes uneven ones, and none on the last rank.
        tokens_of = [6] * world if drop else [2 + 3 * r for r in range(world - 1)] + [0]
        rank = dist.get_rank()

        def make(degree: int, k: int = k, drop: bool = drop, algorithm: str = algorithm) -> MoE:
            torch.manual_seed(30 + 2 * k + drop)
            return MoE(HIDDEN, RowWise(HIDDEN), num_experts=2 * world, k=k, drop_tokens=drop, min_capacity=1,
                       ep_group=comm, algorithm=algorithm, overlap_degree=degree, dispatcher="replicate").double()

        x = rank_input(rank, tokens_of[rank], (HIDDEN,), torch.float64, checked)
        probe = rank_input(rank, tokens_of[rank], (HIDDEN,), torch.float64, checked + 1)
        checked += _against_degree_one(make, x, probe)
        for degree in (2, 3, 4):  # FeedForward experts against the dense reference
            torch.manual_seed(40 + 2 * k + drop)
            layer = MoE(HIDDEN, num_experts=2 * world, k=k, ffn_hidden_size=FFN, drop_tokens=drop, min_capacity=1,
                        use_residual=k == 2, ep_group=comm, algorithm=algorithm, overlap_degree=degree,
                        dispatcher="replicate").double()
            check_against_reference(layer, None, tokens_of, seed=checked + degree)
            checked += 1
    return checked


@pytest.mark.parametrize("world,local_size", [(1, 1), (4, 2)])
def test_overlapped_layer_matches_degree_one_and_reference(worlds, world, local_size):
    assert worlds.run(world, _expert_parallel, local_size, deadline_s=300) == [8 * 7] * world


def _tensor_and_expert_parallel(tp: int, ep: int, local_size: int) -> int:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size)
    checked = 0
    for drop, algorithm in itertools.product([True, False], ["flat", "hierarchical"]):
        tokens_of = [6] * ep if drop else [5 + 4 * e for e in range(ep - 1)] + [0]
        tokens = tokens_of[groups.ep_rank]

        def make(degree: int, drop: bool = drop, algorithm: str = algorithm) -> MoE:
            torch.manual_seed(50 + drop)
            return MoE(HIDDEN, RowWise(HIDDEN), num_experts=2 * ep, k=2, drop_tokens=drop, min_capacity=1,
                       groups=groups, algorithm=algorithm, overlap_degree=degree, dispatcher="replicate").double()

        # TP ranks hold the same tokens: seeded by the EP coordinate.
        x_seed = 1000 * groups.dp_rank + checked
        x = rank_input(groups.ep_rank, tokens, (HIDDEN,), torch.float64, x_seed)
        probe = rank_input(groups.ep_rank, tokens, (HIDDEN,), torch.float64, x_seed + 1)
        checked += _against_degree_one(make, x, probe)
        for degree in (2, 4):
            torch.manual_seed(60 + drop)
            layer = MoE(HIDDEN, num_experts=2 * ep, k=2, ffn_hidden_size=FFN, drop_tokens=drop, min_capacity=1,
                        groups=groups, algorithm=algorithm, overlap_degree=degree, dispatcher="replicate").double()
            check_against_reference(layer, groups.ep_group, tokens_of, 100 * groups.dp_rank + checked,
                                    me=groups.ep_rank)
            checked += 1
    return checked


def test_tensor_and_expert_parallel_overlap(worlds):
    assert worlds.run(4, _tensor_and_expert_parallel, 2, 2, 2, deadline_s=300) == [4 * 6] * 4


def test_overlap_degree_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="overlap_degree=0 must be an integer >= 1"):
        MoE(HIDDEN, num_experts=2, ffn_hidden_size=FFN, overlap_degree=0)
    layer = MoE(HIDDEN, num_experts=2, ffn_hidden_size=FFN, overlap_degree=3)
    assert layer.overlap_degree == 3
    with pytest.raises(ValueError, match=r"overlap_degree=1\.5"):
        layer.overlap_degree = 1.5


@pytest.mark.parametrize("arrived", [True, False])
def test_chunks_run_together_only_when_already_arrived(monkeypatch, arrived):
    """One process: every exchange is complete at once, so the N chunks run
    as one expert call; with exchanges reported as still running, one call
    per chunk. Both equal N = 1."""
    from alltoall.moe import pipeline

    monkeypatch.setattr(pipeline._Ready, "is_completed", lambda self: arrived)
    calls: list[int] = []

    def make(degree: int) -> MoE:
        torch.manual_seed(70)
        layer = MoE(HIDDEN, RowWise(HIDDEN), num_experts=4, k=2, min_capacity=1, overlap_degree=degree).double()
        layer.experts.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        return layer

    x, probe = rank_input(0, 12, (HIDDEN,), torch.float64, 7), rank_input(0, 12, (HIDDEN,), torch.float64, 8)
    base = _step(make(1), x, probe)
    calls.clear()
    result = _step(make(3), x, probe)
    assert len(calls) == (1 if arrived else 3), calls
    assert_same_bytes(result[0], base[0], "N=3 output")
    assert_same_bytes(result[1], base[1], "N=3 input grad")
    for name, grad in result[2].items():
        torch.testing.assert_close(grad, base[2][name], rtol=1e-10, atol=1e-12, msg=name)
