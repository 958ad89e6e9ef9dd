"""Rank layouts of tp x ep x dp against the tables in docs/parallelism.md."""

from __future__ import annotations

import pytest

from alltoall import RankLayout, Topology


def layout(world: int, local: int, **kw) -> RankLayout:
    return RankLayout(Topology.emulate(world, local, 0), **kw)


def test_world16_tp2_ep4_matches_deepspeed_and_megatron():
    # DeepSpeed _create_expert_data_and_model_parallel and Megatron-Core
    # RankGenerator (order tp-cp-ep-dp-pp) give these groups for world 16.
    lay = layout(16, 8, tp=2, ep=4)
    assert lay.dp == 2
    assert lay.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert lay.groups("ep") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert lay.groups("edp") == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert lay.groups("dp") == [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]


def test_without_tp_ep_groups_are_consecutive():
    lay = layout(8, 4, tp=1, ep=2)
    assert lay.groups("ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.groups("edp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("tp,ep,dp", [(2, 4, 1), (4, 2, 1), (2, 2, 2)])
def test_world8_configurations(tp, ep, dp):
    lay = layout(8, 4, tp=tp, ep=ep)
    assert lay.dp == dp
    for kind, size in (("tp", tp), ("ep", ep), ("edp", dp), ("dp", ep * dp)):
        groups = lay.groups(kind)
        assert all(len(g) == size for g in groups), kind
        assert sorted(r for g in groups for r in g) == list(range(8)), f"{kind} groups partition the world"
    for r in range(8):
        c = lay.coordinates(r)
        assert r == c["tp"] + tp * (c["ep"] + ep * c["dp"])
        # Orthogonality: a TP group and an EP group share exactly this rank.
        assert set(lay.group_of("tp", r)) & set(lay.group_of("ep", r)) == {r}


def test_order_changes_which_dimension_is_consecutive():
    lay = layout(8, 4, tp=2, ep=4, order="ep-tp-dp", tp_inside_node=False)
    assert lay.groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.groups("tp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_tp_groups_follow_nodes_on_cyclic_placement():
    # Nodes {0,2,4,6} and {1,3,5,7}: TP pairs are made of same-node ranks.
    topo = Topology.from_node_ids([0, 1] * 4, rank=0)
    lay = RankLayout(topo, tp=2, ep=4)
    assert lay.groups("tp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for g in lay.groups("tp"):
        assert len({topo.node_of_rank[r] for r in g}) == 1


def test_node_and_rail_groups():
    lay = layout(8, 4, tp=2)
    assert lay.groups("node") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.groups("rail") == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("kwargs,message", [
    (dict(tp=3), "tp=3 must be >= 1 and divide the world size 8"),
    (dict(tp=2, ep=3), r"ep=3 must be >= 1 and divide world_size/tp = 8/2 = 4"),
    (dict(tp=2, ep=4, num_experts=6), "ep=4 must divide num_experts=6"),
    (dict(tp=4), r"tp=4 .* puts TP group \[0, 1, 2, 3\] on 2 nodes \(nodes hold \[2\] ranks\)"),
    (dict(order="tp-dp"), "order='tp-dp' must name each of tp, ep, dp once"),
])
def test_bad_configurations_name_the_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layout(8, 2, **kwargs)


def test_tp_may_span_nodes_when_allowed():
    lay = layout(8, 2, tp=4, tp_inside_node=False)
    assert lay.groups("tp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
