"""ParallelGroups and the TP-coordinated all-to-all, against the naive
reference: an all-to-all over the EP group of the TP-replicated input, with
its duplicates across TP ranks removed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

import alltoall
from tests.harness.checks import rank_input
from tests.harness.coordinated_reference import check_equal, check_uneven, replica_key

CONFIGS = [  # (tp, ep, local_size, tp_inside_node)
    (2, 4, 4, True), (2, 4, 2, True),
    (4, 2, 4, True), (4, 2, 2, False),
    (2, 2, 4, True), (2, 2, 2, True),
]


def _equal(tp: int, ep: int, local_size: int, inside: bool) -> int:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size, tp_inside_node=inside)
    assert (groups.tp, groups.ep, groups.dp) == (tp, ep, 8 // (tp * ep))
    return check_equal(groups, ("flat", "hierarchical"), torch.device("cpu"))


def _uneven(tp: int, ep: int, local_size: int, inside: bool) -> int:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size, tp_inside_node=inside)
    return check_uneven(groups, ("flat", "hierarchical"), torch.device("cpu"))


def _gradients(tp: int, ep: int, local_size: int, inside: bool) -> None:
    """Replicated input -> dispatch -> experts (a learnable scale) -> combine
    -> a replicated loss. The input gradient must equal the naive one on
    every rank; the scale's gradient, summed over the TP group (each TP rank
    saw 1/tp of the rows), must equal the naive one."""
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size, tp_inside_node=inside)
    rows = ep * tp * 2
    x0 = rank_input(replica_key(groups, 4), rows, (3,), torch.float64)
    w = rank_input(replica_key(groups, 5), rows, (3,), torch.float64)
    scale0 = torch.full((1,), 1.5 + groups.ep_rank, dtype=torch.float64)

    x_ref, s_ref = x0.clone().requires_grad_(), scale0.clone().requires_grad_()
    mid = dist_fn.all_to_all_single(torch.empty_like(x0), x_ref, group=groups.ep_group) * s_ref
    out_ref = dist_fn.all_to_all_single(torch.empty_like(x0), mid, group=groups.ep_group)
    (out_ref * w).sum().backward()

    for algorithm in ("flat", "hierarchical"):
        x, s = x0.clone().requires_grad_(), scale0.clone().requires_grad_()
        out = groups.coordinated_all_to_all_back(groups.coordinated_all_to_all(x, algorithm) * s, algorithm)
        assert torch.allclose(out, out_ref.detach()), algorithm
        (out * w).sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12), f"input gradient, {algorithm}"
        scale_grad = s.grad.clone()
        dist.all_reduce(scale_grad, group=groups.tp_group)
        assert torch.allclose(scale_grad, s_ref.grad, rtol=1e-12), f"scale gradient, {algorithm}"


@pytest.mark.parametrize("tp,ep,local_size,inside", CONFIGS)
def test_coordinated_equals_naive(worlds, tp, ep, local_size, inside):
    assert worlds.run(8, _equal, tp, ep, local_size, inside) == [6] * 8


@pytest.mark.parametrize("tp,ep,local_size,inside", CONFIGS)
def test_coordinated_v_equals_naive(worlds, tp, ep, local_size, inside):
    assert worlds.run(8, _uneven, tp, ep, local_size, inside) == [6] * 8


@pytest.mark.parametrize("tp,ep,local_size,inside", [(2, 4, 4, True), (4, 2, 4, True), (2, 2, 2, True),
                                                     (4, 2, 2, False)])
def test_gradients_follow_drop_and_gather(worlds, tp, ep, local_size, inside):
    worlds.run(8, _gradients, tp, ep, local_size, inside)


def _membership(tp: int, ep: int, local_size: int) -> dict[str, tuple[int, ...]]:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size)
    out = {kind: groups.ranks(kind) for kind in ("tp", "ep", "edp", "dp", "node", "rail")}
    for kind, ranks in out.items():
        assert dist.get_process_group_ranks(groups.group(kind)) == list(ranks), kind
    assert groups.ep_comm.topology.num_nodes == len({r // local_size for r in out["ep"]})
    return out


@pytest.mark.parametrize("tp,ep,local_size", [(2, 4, 4), (4, 2, 4), (2, 2, 2)])
def test_group_membership_matches_the_layout(worlds, tp, ep, local_size):
    results = worlds.run(8, _membership, tp, ep, local_size)
    layout = alltoall.RankLayout(alltoall.Topology.emulate(8, local_size, 0), tp, ep)
    for rank, groups in enumerate(results):
        for kind, ranks in groups.items():
            assert list(ranks) == layout.group_of(kind, rank), (rank, kind)


def _bad_configurations() -> None:
    cases = [
        (dict(tp=3), "tp=3 must be >= 1 and divide the world size 8"),
        (dict(tp=2, ep=4, num_experts=6), "ep=4 must divide num_experts=6"),
        (dict(tp=4, local_size=2), r"tp=4 .* on 2 nodes"),
        (dict(tp=2, ep=3), r"ep=3 must be >= 1 and divide world_size/tp"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            alltoall.ParallelGroups(**kwargs)
    groups = alltoall.ParallelGroups(2, 4, local_size=4)
    with pytest.raises(ValueError, match=r"dim 0 of the replicated input is 12, not divisible by ep\*tp = 4\*2"):
        groups.coordinated_all_to_all(torch.zeros(12, 2))


def test_bad_configurations_raise_value_errors(worlds):
    worlds.run(8, _bad_configurations, deadline_s=90)


def _interleaved(tp: int, ep: int) -> int:
    # Slurm-cyclic nodes {0,2,4,6} and {1,3,5,7}: TP groups stay inside nodes,
    # so EP coordinates and group order differ and the EP ranks are relabelled.
    topology = alltoall.Topology.from_node_ids([0, 1] * 4, dist.get_rank())
    groups = alltoall.ParallelGroups(tp, ep, topology=topology)
    for ranks in groups.layout.groups("tp"):
        assert len({topology.node_of_rank[r] for r in ranks}) == 1, ranks
    algorithms = ("flat", "hierarchical")
    return check_equal(groups, algorithms, torch.device("cpu")) + check_uneven(groups, algorithms, torch.device("cpu"))


@pytest.mark.parametrize("tp,ep", [(2, 4), (4, 2), (2, 2)])
def test_coordinated_on_interleaved_nodes(worlds, tp, ep):
    assert worlds.run(8, _interleaved, tp, ep) == [12] * 8
