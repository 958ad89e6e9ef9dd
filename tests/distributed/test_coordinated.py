"""ParallelGroups and the TP-coordinated all-to-all, against the naive
reference: an all-to-all over the EP group of the TP-replicated input, with
its duplicates across TP ranks removed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

import alltoall
from alltoall.ops.coordinated import Chunking
from tests.harness.checks import assert_same_bytes, rank_input

CONFIGS = [  # (tp, ep, local_size, tp_inside_node)
    (2, 4, 4, True), (2, 4, 2, True),
    (4, 2, 4, True), (4, 2, 2, False),
    (2, 2, 4, True), (2, 2, 2, True),
]


def naive(x: torch.Tensor, group, ins=None, outs=None) -> torch.Tensor:
    rows = x.shape[0] if outs is None else sum(outs)
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype)
    dist.all_to_all_single(out, x, outs, ins, group=group)
    return out


def chunks_of(full: torch.Tensor, block_rows: list[int], tp: int, t: int) -> torch.Tensor:
    chunking = Chunking(tuple(block_rows), tp)
    return torch.ops.alltoall.gather_blocks(full, chunking.chunk_starts(t), chunking.sizes(t))


def replica_key(groups: alltoall.ParallelGroups, salt: int) -> int:
    """The same on every rank of a TP group: what makes inputs replicated."""
    return salt * 1000 + groups.dp_rank * 100 + groups.ep_rank


def _equal(tp: int, ep: int, local_size: int, inside: bool) -> None:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size, tp_inside_node=inside)
    assert (groups.tp, groups.ep, groups.dp) == (tp, ep, 8 // (tp * ep))
    t, rows = groups.tp_rank, ep * tp * 3
    x = rank_input(replica_key(groups, 1), rows, (5,), torch.float32)
    reference = naive(x, groups.ep_group)
    expected = chunks_of(reference, [rows // ep] * ep, tp, t)
    full_y = rank_input(replica_key(groups, 2), rows, (5,), torch.float32)
    y = chunks_of(full_y, [rows // ep] * ep, tp, t)
    for algorithm in ("flat", "hierarchical"):
        out = groups.coordinated_all_to_all(x, algorithm)
        assert_same_bytes(out, expected, f"dispatch {algorithm}")
        assert_same_bytes(groups.coordinated_all_to_all_back(out, algorithm), x, f"round trip {algorithm}")
        assert_same_bytes(groups.coordinated_all_to_all_back(y, algorithm), naive(full_y, groups.ep_group),
                          f"combine {algorithm}")


def _uneven(tp: int, ep: int, local_size: int, inside: bool) -> None:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size, tp_inside_node=inside)
    t = groups.tp_rank
    g = torch.Generator().manual_seed(7 + groups.dp_rank)  # one split matrix per EP group
    matrix = torch.randint(0, 7, (ep, ep), generator=g).tolist()
    matrix[0][ep - 1] = 0  # a zero-sized block
    ins, outs = matrix[groups.ep_rank], [matrix[s][groups.ep_rank] for s in range(ep)]
    x = rank_input(replica_key(groups, 3), sum(ins), (3,), torch.float32)
    reference = naive(x, groups.ep_group, ins, outs)
    expected = chunks_of(reference, outs, tp, t)
    for algorithm in ("flat", "hierarchical"):
        out = groups.coordinated_all_to_all_v(x, ins, outs, algorithm)
        assert_same_bytes(out, expected, f"dispatch-v {algorithm}")
        out2, chunk_splits = groups.coordinated_all_to_all_v(x, ins, algorithm=algorithm)
        assert_same_bytes(out2, expected, f"dispatch-v counts exchanged {algorithm}")
        assert chunk_splits == Chunking(tuple(outs), tp).sizes(t)
        back = groups.coordinated_all_to_all_back_v(out, chunk_splits, ins, algorithm)
        assert_same_bytes(back, x, f"round trip v {algorithm}")


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
    worlds.run(8, _equal, tp, ep, local_size, inside)


@pytest.mark.parametrize("tp,ep,local_size,inside", CONFIGS)
def test_coordinated_v_equals_naive(worlds, tp, ep, local_size, inside):
    worlds.run(8, _uneven, tp, ep, local_size, inside)


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
