"""The gate: the documented capacity rule, which tokens drop, tie breaking,
the combine weights and the auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch

from alltoall.moe import TopKGate, expert_capacity, load_balancing_loss, router_z_loss


@pytest.mark.parametrize(
    "tokens,experts,k,factor,minimum,expected",
    [
        (8, 4, 1, 1.0, 0, 2),  # S/E
        (8, 4, 2, 1.0, 0, 4),  # k * S / E
        (10, 4, 1, 1.25, 0, 4),  # ceil(3.125)
        (10, 4, 3, 1.0, 0, 8),  # ceil(7.5); DeepSpeed's k * ceil(2.5) would be 9
        (8, 8, 1, 1.0, 4, 4),  # min_capacity wins over 1
        (2, 8, 1, 1.0, 4, 2),  # never more than the tokens
        (0, 8, 1, 1.0, 4, 0),
        (4096, 64, 2, 1.0, 4, 128),
    ],
)
def test_capacity_rule(tokens, experts, k, factor, minimum, expected):
    assert expert_capacity(tokens, experts, k, factor, minimum) == expected
    if tokens:
        assert expected == min(tokens, max(minimum, math.ceil(k * tokens * factor / experts)))


def test_capacity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="capacity_factor=0"):
        expert_capacity(8, 4, 1, 0.0, 1)
    with pytest.raises(ValueError, match="min_capacity=-1"):
        expert_capacity(8, 4, 1, 1.0, -1)
    with pytest.raises(ValueError, match="k=5"):
        expert_capacity(8, 4, 5, 1.0, 1)


def gate_with_logits(logits: torch.Tensor, k: int) -> TopKGate:
    """A gate whose logits for the one-hot tokens eye(S) are ``logits``."""
    gate = TopKGate(logits.shape[0], logits.shape[1], k)
    with torch.no_grad():
        gate.wg.weight.copy_(logits.t())
    return gate


def test_first_choices_in_token_order_take_the_slots():
    # Four tokens prefer expert 0, capacity 2: tokens 0 and 1 keep their slot.
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    out = gate_with_logits(logits, 1)(torch.eye(5), capacity=2)
    assert out.routing.dest_row.squeeze(1).tolist() == [0, 1, -1, -1, 2]
    assert out.counts.tolist() == [4, 1]


def test_second_choices_queue_behind_all_first_choices():
    # Token 0's second choice is expert 1, which tokens 1 and 2 pick first:
    # with capacity 2 those first choices win although token 0 comes earlier.
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [0.0, 3.0, 2.0], [2.0, 0.0, 3.0]])
    routing = gate_with_logits(logits, 2)(torch.eye(4), capacity=2).routing
    assert routing.expert_index.tolist() == [[0, 1], [1, 2], [1, 2], [2, 0]]
    kept = (routing.dest_row >= 0).tolist()
    assert kept == [[True, False], [True, True], [True, False], [True, True]]
    # Expert 2: token 3's first choice (slot 0), then token 1's second (slot 1); token 2's second drops.
    assert routing.dest_row[3, 0] == 2 * 2 + 0 and routing.dest_row[1, 1] == 2 * 2 + 1


def test_dropless_keeps_everything_expert_major():
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    routing = gate_with_logits(logits, 1)(torch.eye(4), capacity=None).routing
    assert routing.dest_row.squeeze(1).tolist() == [0, 1, 2, 3]
    assert routing.capacity is None and routing.num_rows == 4


def test_ties_break_toward_the_lower_expert():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 2.0]])
    routing = gate_with_logits(logits, 2)(torch.eye(2), capacity=None).routing
    assert routing.expert_index.tolist() == [[0, 1], [1, 3]]


def test_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    for k, normalize in ((1, None), (2, None), (2, False), (3, True)):
        gate = TopKGate(8, 5, k, normalize_weights=normalize)
        out = gate(x, capacity=None)
        probs = torch.softmax(gate.logits(x), dim=1)
        picked = probs.gather(1, out.routing.expert_index)
        if normalize is False or (normalize is None and k == 1):
            torch.testing.assert_close(out.weights, picked)  # Switch: the probability itself
        else:
            torch.testing.assert_close(out.weights, picked / picked.sum(1, keepdim=True))
            torch.testing.assert_close(out.weights.sum(1), torch.ones(16))


def test_gate_computes_in_float32_for_half_inputs():
    gate = TopKGate(8, 4, 2)
    out = gate(torch.randn(5, 8).to(torch.bfloat16), capacity=None)
    assert out.weights.dtype == torch.float32 and out.aux_loss.dtype == torch.float32


def test_load_balancing_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    gate = TopKGate(8, 4, 2)
    out = gate(x, capacity=3)
    probs = torch.softmax(gate.logits(x), dim=1)
    fraction = torch.bincount(out.routing.expert_index.reshape(-1), minlength=4).float() / 64  # before drops
    expected = 4 * (probs.mean(0) * fraction).sum()
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.balance_loss, expected)
    out.aux_loss.backward()
    assert gate.wg.weight.grad is not None and gate.wg.weight.grad.abs().sum() > 0
    # Perfect balance gives 1.
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([2, 2, 2, 2]), 1).item() == pytest.approx(1.0)
    assert load_balancing_loss(torch.zeros(0, 4), torch.zeros(4, dtype=torch.int64), 1).item() == 0.0


def test_router_z_loss():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)
    gate = TopKGate(4, 3, 1, z_loss_coef=0.1)
    x = torch.randn(6, 4)
    out = gate(x, capacity=None)
    torch.testing.assert_close(out.aux_loss, out.balance_loss + 0.1 * router_z_loss(gate.logits(x)))
    torch.testing.assert_close(out.z_loss, router_z_loss(gate.logits(x)))


def test_gate_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"k=3 must be in \[1, num_experts=2\]"):
        TopKGate(4, 2, 3)
    with pytest.raises(ValueError, match="num_experts=0"):
        TopKGate(4, 0, 1)
    with pytest.raises(ValueError, match="z_loss_coef=-1"):
        TopKGate(4, 2, 1, z_loss_coef=-1)
