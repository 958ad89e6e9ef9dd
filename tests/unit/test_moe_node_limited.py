"""Node-limited routing (DeepSeek-V3's rule) in the gate: no token reaches
more than N nodes, the gate equals the plain-loop reference of the rule, and
N >= the number of nodes is plain top-k bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch

from alltoall.moe import MoE, TopKGate
from alltoall.moe.node_limited import allowed_experts, check_node_map, expert_nodes, node_scores
from alltoall.moe.reference import reference_node_limited_top_k
from tests.harness.moe_checks import grads_of, reference_like

# (E, node of every expert): consecutive placement, a cyclic one (the EP
# ranks of a node interleaved), and nodes of unequal sizes.
CONSECUTIVE_2X4 = [e // 8 for e in range(16)]  # 16 experts, 8 EP ranks of 2 experts, 2 nodes of 4 ranks
CYCLIC_4X2 = [(e // 2) % 4 for e in range(16)]  # EP rank r on node r % 4
UNEVEN = [0] * 6 + [1] * 2 + [2] * 4  # 12 experts on nodes of 6, 2 and 4 experts
PLACEMENTS = {"2x4": CONSECUTIVE_2X4, "cyclic-4x2": CYCLIC_4X2, "uneven": UNEVEN}


def gate_for(nodes: list[int], k: int, max_nodes: int | None, seed: int = 0, dtype=torch.float64) -> TopKGate:
    torch.manual_seed(seed)
    return TopKGate(12, len(nodes), k, max_nodes=max_nodes, expert_node=nodes).to(dtype)


def _feasible(nodes: list[int], k: int, max_nodes: int) -> bool:
    """Whether any N nodes hold at least k experts (else the gate rejects the setting)."""
    sizes = sorted(nodes.count(n) for n in set(nodes))
    return max_nodes >= len(sizes) or sum(sizes[:max_nodes]) >= k


@pytest.mark.parametrize("placement,k,max_nodes", [
    (name, k, n) for name, k, n in itertools.product(PLACEMENTS, [1, 2, 3, 4, 8], [1, 2, 3])
    if _feasible(PLACEMENTS[name], k, n)
])
def test_gate_equals_the_reference_and_respects_the_limit(placement, k, max_nodes):
    nodes = PLACEMENTS[placement]
    gate = gate_for(nodes, k, max_nodes, seed=k + 10 * max_nodes)
    x = torch.randn(200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    for capacity in (None, 6):
        routing = gate(x, capacity).routing
        index = routing.expert_index
        expected = reference_node_limited_top_k(gate.logits(x).detach(), k, nodes, max_nodes)
        assert torch.equal(index, expected)
        node_of = torch.tensor(nodes)[index]
        spanned = torch.tensor([len(set(row)) for row in node_of.tolist()])
        assert int(spanned.max()) <= max_nodes
        assert index.unique(dim=1).shape == index.shape  # k distinct experts per token
    # With k <= N every node counts its best expert only, and a token's k best
    # experts always lie on its k best nodes by that score: the limit cannot bind.
    if k > max_nodes and max_nodes < len(set(nodes)):
        plain = TopKGate(12, len(nodes), k).to(torch.float64)
        plain.wg.weight.data.copy_(gate.wg.weight)
        differs = (plain(x, None).routing.expert_index != index).any(dim=1)
        assert differs.any(), "the limit changed no token's routing: the case tests nothing"


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("k", [1, 2, 8])
def test_enough_nodes_is_plain_top_k_bit_for_bit(placement, k):
    nodes = PLACEMENTS[placement]
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(3))
    for max_nodes in (len(set(nodes)), len(set(nodes)) + 2):
        limited = gate_for(nodes, k, max_nodes, seed=5, dtype=torch.float32)
        plain = gate_for(nodes, k, None, seed=5, dtype=torch.float32)
        for capacity in (None, 8):
            a, b = limited(x, capacity), plain(x, capacity)
            for name in ("expert_index", "dest_row", "source", "counts"):
                assert torch.equal(getattr(a.routing, name), getattr(b.routing, name)), name
            assert torch.equal(a.weights, b.weights) and torch.equal(a.aux_loss, b.aux_loss)


def test_node_scores_sum_the_best_k_over_n_affinities():
    probs = torch.tensor([[0.30, 0.05, 0.20, 0.15, 0.10, 0.20]])
    nodes = torch.tensor([0, 0, 0, 1, 1, 2])
    # k=4, N=2: the best 2 per node (node 2 has one expert).
    assert torch.allclose(node_scores(probs, nodes, 4, 2), torch.tensor([[0.50, 0.25, 0.20]]))
    # k=5, N=2: floor(5/2) = 2 as well; k=1, N=2: the floor is 0, taken as 1.
    assert torch.allclose(node_scores(probs, nodes, 5, 2), torch.tensor([[0.50, 0.25, 0.20]]))
    assert torch.allclose(node_scores(probs, nodes, 1, 2), torch.tensor([[0.30, 0.15, 0.20]]))
    # Equal scores go to the lower node: nodes 1 and 2 tie at 0.2 with one expert each counted.
    tie = torch.tensor([[0.1, 0.2, 0.2, 0.5]])
    allowed = allowed_experts(tie, torch.tensor([0, 1, 2, 3]), 2, 2)
    assert allowed.tolist() == [[False, True, False, True]]


def test_only_the_chosen_nodes_experts_are_picked_even_with_a_better_expert_elsewhere():
    # Node 0 holds the single best expert (0.4) but node 1's pair sums higher (0.3 + 0.25).
    logits = torch.log(torch.tensor([[0.4, 0.01, 0.3, 0.25, 0.02, 0.02]]))
    nodes = [0, 0, 1, 1, 2, 2]
    gate = TopKGate(6, 6, 2, max_nodes=1, expert_node=nodes)
    with torch.no_grad():
        gate.wg.weight.copy_(logits.reshape(6, 1).expand(6, 6) * torch.eye(6))
    routing = gate(torch.ones(1, 6), None).routing
    assert routing.expert_index.tolist() == [[2, 3]]


def test_layer_with_max_nodes_matches_the_dense_reference():
    torch.manual_seed(1)
    layer = MoE(6, num_experts=8, k=2, ffn_hidden_size=10, drop_tokens=False, max_nodes=1).double()
    assert layer.gate.expert_node.tolist() == [0] * 8  # one process is one node: no limit
    layer.gate.expert_node = check_node_map([e // 2 for e in range(8)], 8, 2, 2)  # as if on 4 nodes
    layer.gate.max_nodes = 2
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    out, aux, counts = layer(x)
    (out.sum() + aux).backward()
    reference = reference_like(layer, list(layer.experts.experts), 40)
    xr = x.detach().clone().requires_grad_()
    out_r, aux_r, counts_r = reference(xr)
    (out_r.sum() + aux_r).backward()
    torch.testing.assert_close(out, out_r)
    assert torch.equal(counts, counts_r)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(grads_of(layer)["gate.wg.weight"], grads_of(reference)["gate_weight"])


def test_expert_nodes_without_a_communicator_is_one_node():
    assert expert_nodes(None, 4) == [0, 0, 0, 0]


def test_bad_node_maps_raise_value_errors():
    with pytest.raises(ValueError, match="expert_node has 3 entries, expected one per expert \\(num_experts=4\\)"):
        check_node_map([0, 0, 1], 4, 2, 1)
    with pytest.raises(ValueError, match=r"node ids 0\.\.n-1"):
        check_node_map([0, 0, 2, 2], 4, 2, 1)
    with pytest.raises(ValueError, match="max_nodes=0 must be >= 1"):
        check_node_map([0, 0, 1, 1], 4, 2, 0)
    with pytest.raises(ValueError, match="the 1 smallest nodes hold 2 experts, fewer than k=3"):
        check_node_map([0, 0, 1, 1], 4, 3, 1)
    with pytest.raises(ValueError, match="max_nodes=2 needs expert_node"):
        TopKGate(4, 4, 2, max_nodes=2)
    with pytest.raises(ValueError, match="max_nodes=0 must be >= 1"):
        MoE(4, num_experts=2, ffn_hidden_size=8, max_nodes=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_equals_megatron_core_group_limited_top_k():
    """Megatron-Core's moe_router_num_groups = nodes, moe_router_group_topk = N,
    on softmax probabilities (moe_router_pre_softmax=True), consecutive placement."""
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils",
                                    reason="Megatron-Core is not installed (pip install megatron-core)")
    for k, max_nodes, nodes in ((8, 2, 4), (4, 2, 4), (6, 3, 4), (8, 4, 8), (2, 1, 2)):
        experts = 32
        gate = TopKGate(12, experts, k, max_nodes=max_nodes,
                        expert_node=[e // (experts // nodes) for e in range(experts)]).double()
        x = torch.randn(300, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        probs = torch.softmax(gate.logits(x), dim=1).detach()
        _, theirs = moe_utils.group_limited_topk(probs, k, 300, experts, nodes, max_nodes)
        assert torch.equal(gate(x, None).routing.expert_index, theirs), (k, max_nodes, nodes)
