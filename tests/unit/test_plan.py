"""Exchange plans: message counts per link class, and, by simulating every
rank's plan on labelled blocks, that each algorithm delivers what a flat
all-to-all delivers."""

from __future__ import annotations

import random

import pytest

import alltoall
from alltoall.plan import make_plan

SHAPES = [(1, 1), (2, 1), (2, 2), (4, 2), (8, 4), (8, 8), (16, 4), (12, 3), (64, 8), (4096, 8), (4096, 64), (4096, 1)]


@pytest.mark.parametrize("p,g", SHAPES)
def test_flat_sends_p_minus_1_messages(p, g):
    summary = alltoall.plan(p, g, "flat")
    assert summary.messages == p - 1
    assert summary.intra_node.messages == g - 1
    assert summary.inter_node.messages == p - g


@pytest.mark.parametrize("p,g", SHAPES)
def test_hierarchical_sends_g_minus_1_then_p_over_g_minus_1(p, g):
    summary = alltoall.plan(p, g, "hierarchical")
    assert summary.intra_node.messages == g - 1
    assert summary.inter_node.messages == p // g - 1


@pytest.mark.parametrize("p,g", [(8, 4), (4096, 8), (64, 8)])
def test_bytes_per_link_class(p, g):
    per_rank = 1 << 20
    block = per_rank / p
    flat = alltoall.plan(p, g, "flat", bytes_per_rank=per_rank)
    assert flat.intra_node.bytes == round((g - 1) * block)
    assert flat.inter_node.bytes == round((p - g) * block)
    hier = alltoall.plan(p, g, "hierarchical", bytes_per_rank=per_rank)
    # Each intra-node message carries one block per node, each inter-node
    # message one block per local rank: every byte crosses both fabrics.
    assert hier.intra_node.bytes == round((g - 1) * (p // g) * block)
    assert hier.inter_node.bytes == round((p // g - 1) * g * block)


def simulate(
    node_of_rank: list[int], algorithm: str, rank_order: list[int] | None = None
) -> list[list[tuple[int, int]]]:
    """Runs every rank's plan on blocks labelled (source, destination), where
    block i of a rank's input is for group rank rank_order[i]."""
    p = len(node_of_rank)
    order = rank_order or list(range(p))
    plans = [make_plan(node_of_rank, r, algorithm, rank_order=rank_order) for r in range(p)]
    buffers = [[(r, order[i]) for i in range(p)] for r in range(p)]
    for step in range(len(plans[0].phases)):
        for r in range(p):
            perm = plans[r].phases[step].pre_permutation
            if perm:
                buffers[r] = [buffers[r][i] for i in perm]
        received = [None] * p
        for r in range(p):
            phase = plans[r].phases[step]
            group = phase.group_ranks
            assert group[phase.index_in_group] == r
            k = phase.blocks_per_peer
            me = phase.index_in_group
            incoming = []
            for peer in group:
                peer_phase = plans[peer].phases[step]
                assert list(peer_phase.group_ranks) == list(group), "members disagree on the group"
                incoming += buffers[peer][me * k:(me + 1) * k]
            received[r] = incoming
        buffers = received
    for r in range(p):
        perm = plans[r].post_permutation
        if perm:
            buffers[r] = [buffers[r][i] for i in perm]
    return buffers


def layouts():
    rng = random.Random(7)
    cases = [
        [0, 0, 1, 1],
        [0, 1, 0, 1],  # Slurm cyclic
        [0, 1, 2, 0, 1, 2],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 1, 1, 0, 2, 3, 3, 2],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ]
    for nodes, per in [(3, 4), (4, 2), (2, 8), (5, 3)]:
        ids = [n for n in range(nodes) for _ in range(per)]
        rng.shuffle(ids)
        first = {}
        cases.append([first.setdefault(i, len(first)) for i in ids])
    return cases


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
@pytest.mark.parametrize("node_of_rank", layouts(), ids=lambda n: "".join(map(str, n)))
def test_plan_delivers_what_flat_all_to_all_delivers(node_of_rank, algorithm):
    p = len(node_of_rank)
    result = simulate(node_of_rank, algorithm)
    for r in range(p):
        assert result[r] == [(s, r) for s in range(p)]


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
@pytest.mark.parametrize("node_of_rank", layouts()[:8], ids=lambda n: "".join(map(str, n)))
def test_rank_order_relabels_sources_and_destinations(node_of_rank, algorithm):
    p = len(node_of_rank)
    order = list(range(p))
    random.Random(p).shuffle(order)
    result = simulate(node_of_rank, algorithm, order)
    for r in range(p):
        assert result[r] == [(order[i], r) for i in range(p)]


def test_rank_order_must_be_a_permutation():
    with pytest.raises(ValueError, match="entry 2 is 1"):
        make_plan([0, 0, 1, 1], 0, "flat", rank_order=[0, 1, 1, 3])
    with pytest.raises(ValueError, match="rank_order has 3 entries"):
        make_plan([0, 0, 1, 1], 0, "flat", rank_order=[0, 1, 2])


def test_consecutive_nodes_need_no_final_reorder():
    for r in range(16):
        assert list(make_plan([i // 4 for i in range(16)], r, "hierarchical").post_permutation) == []


def test_degenerate_hierarchies_collapse_to_one_phase():
    assert len(make_plan([0] * 8, 3, "hierarchical").phases) == 1
    assert len(make_plan(list(range(8)), 3, "hierarchical").phases) == 1


def test_bad_plans_name_the_value():
    with pytest.raises(ValueError, match=r"unequal sizes \[3, 1\]"):
        make_plan([0, 0, 0, 1], 0, "hierarchical")
    with pytest.raises(ValueError, match="ranks_per_node=3"):
        alltoall.plan(8, 3, "flat")
    with pytest.raises(ValueError, match="'ring'"):
        alltoall.plan(8, 2, "ring")
    with pytest.raises(ValueError, match="rank=9"):
        make_plan([0] * 4, 9, "flat")
    with pytest.raises(ValueError, match="node 1 has no rank"):
        make_plan([0, 2], 0, "flat")


@pytest.mark.parametrize("p,g,tp", [(8, 4, 2), (8, 4, 4), (16, 8, 2), (128, 8, 8), (4096, 8, 8), (8, 2, 1)])
def test_coordinated_sends_p_over_tp_minus_1_then_tp_minus_1(p, g, tp):
    summary = alltoall.plan(p, g, "coordinated", tp=tp)
    phases = [(ph.collective, ph.role, len(ph.group_ranks)) for ph in summary.phases]
    expected = [("all_to_all", "expert", p // tp), ("all_gather", "tensor", tp)]
    assert phases == [ph for ph in expected if ph[2] > 1]
    assert summary.messages == (p // tp - 1) + (tp - 1)


def test_coordinated_paper_example():
    # DeepSpeed-MoE 5.3: 128 GPUs with 8-way tensor slicing exchange with 16
    # peers' worth of latency instead of 128.
    assert alltoall.plan(128, 8, "coordinated", tp=8).messages == 15 + 7
    assert alltoall.plan(128, 8, "flat").messages == 127


def test_tp_only_applies_to_coordinated():
    with pytest.raises(ValueError, match="tp=2 applies to the coordinated algorithm only"):
        alltoall.plan(8, 4, "flat", tp=2)
    with pytest.raises(ValueError, match="tp=3 must be >= 1 and divide world_size=8"):
        alltoall.plan(8, 4, "coordinated", tp=3)


@pytest.mark.parametrize(
    ("world", "per_node", "algorithm", "tp", "transport", "expected"),
    [
        (16, 8, "flat", 1, "auto", ("c10d",)),
        (8, 8, "flat", 1, "auto", ("shm",)),
        (16, 8, "hierarchical", 1, "auto", ("shm", "c10d")),
        (16, 8, "hierarchical", 1, "c10d", ("c10d", "c10d")),
        (16, 4, "coordinated", 2, "auto", ("c10d", "shm")),
        (8, 8, "hierarchical", 1, "shm", ("shm",)),
    ],
)
def test_plans_say_what_carries_each_phase(world, per_node, algorithm, tp, transport, expected):
    summary = alltoall.plan(world, per_node, algorithm, tp, transport=transport)
    assert summary.transports == expected
    assert len(summary.transports) == len(summary.phases)


def test_shared_memory_cannot_carry_a_phase_across_nodes():
    with pytest.raises(ValueError, match="transport='shm': the inter_node phase of the hierarchical plan spans nodes"):
        alltoall.plan(16, 8, "hierarchical", transport="shm")
    with pytest.raises(ValueError, match="transport='tcp' is not one of auto, shm, c10d"):
        alltoall.plan(16, 8, "flat", transport="tcp")
