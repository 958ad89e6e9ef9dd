"""Node-limited routing with a real EP group: the layer takes the node of
every expert from its Communicator's topology (consecutive, cyclic and
ParallelGroups placements), no token reaches more than max_nodes nodes, and
the layer matches the dense reference that applies the same rule."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.moe import MoE
from tests.harness.moe_checks import HIDDEN, check_against_reference

FFN = 10


def _limited(node_ids: list[int], max_nodes: int, k: int) -> list[int]:
    rank = dist.get_rank()
    comm = alltoall.Communicator(topology=alltoall.Topology.from_node_ids(node_ids, rank))
    num_experts = 2 * len(node_ids)
    spans = []
    for drop in (False, True):
        torch.manual_seed(7 + drop)
        layer = MoE(HIDDEN, num_experts=num_experts, k=k, ffn_hidden_size=FFN, drop_tokens=drop, min_capacity=1,
                    ep_group=comm, max_nodes=max_nodes).double()
        assert layer.gate.expert_node.tolist() == [node_ids[e // 2] for e in range(num_experts)]
        check_against_reference(layer, None, [12] * len(node_ids), seed=3 + drop)
        x = torch.randn(50, HIDDEN, dtype=torch.float64)
        index = layer.gate(x, None).routing.expert_index
        spans.append(max(len({node_ids[int(e) // 2] for e in row}) for row in index))
    return spans


@pytest.mark.parametrize("node_ids,max_nodes,k", [
    ([0, 0, 1, 1], 1, 4),  # 2 nodes x 2 ranks, consecutive
    ([0, 1, 0, 1], 1, 3),  # cyclic: EP ranks 0 and 2 on node 0
    ([0, 1, 2, 3], 2, 4),  # 4 nodes of one rank
])
def test_layer_limits_tokens_to_max_nodes(worlds, node_ids, max_nodes, k):
    results = worlds.run(len(node_ids), _limited, node_ids, max_nodes, k, deadline_s=120)
    assert all(span <= max_nodes for spans in results for span in spans)


def _parallel_groups() -> None:
    groups = alltoall.ParallelGroups(2, 2, local_size=2)  # 4 ranks: TP pairs inside nodes, EP across the 2 nodes
    torch.manual_seed(3)
    layer = MoE(HIDDEN, num_experts=8, k=4, ffn_hidden_size=FFN, drop_tokens=False, groups=groups,
                max_nodes=1).double()
    assert layer.gate.expert_node.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    check_against_reference(layer, groups.ep_group, [6, 9], seed=groups.dp_rank, me=groups.ep_rank)


def test_parallel_groups_give_the_ep_ranks_nodes(worlds):
    worlds.run(4, _parallel_groups, deadline_s=120)
