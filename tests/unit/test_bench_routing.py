"""The benchmarks' drawn routing: reproducible from the seed, k distinct
experts per token, skewed under Zipf, and routed by DrawnRoutingGate with
the gate's own weights and losses."""

from __future__ import annotations

import pytest
import torch

from alltoall.cli.bench_routing import DrawnRoutingGate, drawn_scores, popularity
from alltoall.moe import MoE, TopKGate


def test_draws_are_reproducible_per_seed_and_rank():
    a = drawn_scores(50, 16, "zipf", 1.2, seed=3, rank=1)
    assert torch.equal(a, drawn_scores(50, 16, "zipf", 1.2, seed=3, rank=1))
    assert not torch.equal(a, drawn_scores(50, 16, "zipf", 1.2, seed=3, rank=2))
    assert not torch.equal(a, drawn_scores(50, 16, "zipf", 1.2, seed=4, rank=1))


def test_popularity():
    assert torch.allclose(popularity(8, "uniform", 0.0, 0), torch.full((8,), 1 / 8, dtype=torch.float64))
    p = popularity(8, "zipf", 1.0, 5)
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert sorted(p.tolist(), reverse=True)[0] / sorted(p.tolist())[0] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="'pareto' is not one of"):
        popularity(8, "pareto", 1.0, 0)


def test_zipf_draws_follow_the_popularity():
    scores = drawn_scores(20000, 8, "zipf", 1.0, seed=1)
    first = torch.bincount(scores.argmax(dim=1), minlength=8).double() / 20000
    torch.testing.assert_close(first, popularity(8, "zipf", 1.0, 1), atol=0.02, rtol=0)


def test_drawn_routing_gate_routes_by_the_draw_with_the_gates_weights():
    torch.manual_seed(0)
    layer = MoE(8, num_experts=8, k=3, ffn_hidden_size=8, drop_tokens=False)
    gate: TopKGate = layer.gate
    scores = drawn_scores(12, 8, "uniform", seed=2)
    before = torch.rand(1)
    torch.manual_seed(0)
    layer = MoE(8, num_experts=8, k=3, ffn_hidden_size=8, drop_tokens=False)
    layer.gate = DrawnRoutingGate(layer.gate, scores)
    assert torch.equal(torch.rand(1), before), "the wrapper moved the global RNG"
    x = torch.randn(12, 8, requires_grad=True)
    out = layer.gate(x, None)
    assert torch.equal(out.routing.expert_index, scores.topk(3, dim=1).indices)
    probs = torch.softmax(gate.logits(x), dim=1)
    picked = probs.gather(1, out.routing.expert_index)
    torch.testing.assert_close(out.weights, picked / picked.sum(1, keepdim=True))
    y, aux, _ = layer(x)
    (y.sum() + aux).backward()
    assert layer.gate.wg.weight.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match=r"drawn routing of shape \(12, 8\) for logits of shape \(5, 8\)"):
        layer(torch.randn(5, 8))
