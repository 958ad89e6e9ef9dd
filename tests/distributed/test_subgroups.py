"""Subgroup creation when torch splits the parent's communicator.

With a default group created with device_id= (eager NCCL), torch builds every
subgroup with ncclCommSplit, a collective over the whole parent: a subgroup
made by its members alone (local synchronisation) would leave them waiting.
alltoall then passes each partition whole to one split_group call that every
rank of the parent joins. On the CPU the split is emulated by a stand-in
that is itself collective over the parent (an all-gather of the partition
every rank passed), so a rank that skipped a split, or passed another
partition, fails the test; on 2 or more GPUs the real thing runs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.transport import process_group, splits_parent_communicator
from tests.distributed.test_devices import nccl_world
from tests.harness.checks import assert_same_bytes, rank_input
from tests.harness.devices import cuda_count


def collective_split(calls: list):
    def split_group(parent_pg, split_ranks, timeout=None, group_desc=None):
        seen: list = [None] * parent_pg.size()
        dist.all_gather_object(seen, (group_desc, split_ranks), group=parent_pg)
        assert all(s == (group_desc, split_ranks) for s in seen), f"ranks split differently: {seen}"
        calls.append((group_desc, dist.get_process_group_ranks(parent_pg), split_ranks))
        members = dist.get_process_group_ranks(parent_pg)
        me = dist.get_rank(parent_pg)
        mine = next((part for part in split_ranks if me in part), None)
        if mine is None:
            return None
        return dist.new_group([members[r] for r in mine], timeout=timeout, use_local_synchronization=True)

    return split_group


def exchange_checks(comm: alltoall.Communicator, group: dist.ProcessGroup | None, device: torch.device) -> None:
    x = rank_input(dist.get_rank(), 2 * comm.size, (3,), torch.float32).to(device)
    expected = torch.empty_like(x)
    dist.all_to_all_single(expected, x, group=group)
    for algorithm in ("flat", "hierarchical"):
        assert_same_bytes(comm.all_to_all(x, algorithm).cpu(), expected.cpu(), algorithm)


def build_everything(device: torch.device) -> None:
    rank = dist.get_rank()
    exchange_checks(alltoall.Communicator(local_size=2), None, device)
    # A Communicator on a subgroup, built by its members alone.
    evens, odds = dist.new_group([0, 2, 4, 6]), dist.new_group([1, 3, 5, 7])
    mine = evens if rank % 2 == 0 else odds
    exchange_checks(alltoall.Communicator(mine, local_size=2), mine, device)
    groups = alltoall.ParallelGroups(tp=2, local_size=4)
    assert dist.get_process_group_ranks(groups.tp_group) == [rank - rank % 2, rank - rank % 2 + 1]
    exchange_checks(groups.ep_comm, groups.ep_group, device)


def _with_emulated_split() -> list:
    assert not splits_parent_communicator()  # gloo without a bound device: local synchronisation
    calls: list = []
    saved = process_group.splits_parent_communicator, dist.split_group
    process_group.splits_parent_communicator = lambda: True
    dist.split_group = collective_split(calls)
    try:
        build_everything(torch.device("cpu"))
    finally:
        process_group.splits_parent_communicator, dist.split_group = saved
    return calls


def test_subgroups_are_split_collectively_over_the_parent(worlds):
    calls = worlds.run(8, _with_emulated_split, deadline_s=240, collective_timeout_s=30)
    # Ranks of one parity share every parent (world, their half, their EP group).
    assert all(c == calls[0] for c in calls[0::2]) and all(c == calls[1] for c in calls[1::2])
    by_desc = {(desc, tuple(parent)): parts for desc, parent, parts in calls[0]}
    world = tuple(range(8))
    # Parent ranks of the world: nodes of 2, then the ranks with one local index.
    assert by_desc[("alltoall_intra_node", world)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert by_desc[("alltoall_inter_node", world)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # On the even subgroup, parts are in its own ranks (0..3 for 0, 2, 4, 6).
    assert by_desc[("alltoall_intra_node", (0, 2, 4, 6))] == [[0, 1], [2, 3]]
    assert by_desc[("alltoall_tp", world)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def _on_eager_nccl(store_dir: str) -> bool:
    device = nccl_world(store_dir, bound=True)
    assert splits_parent_communicator()
    world = dist.get_world_size()
    exchange_checks(alltoall.Communicator(local_size=2 if world % 2 == 0 else 1), None, device)
    groups = alltoall.ParallelGroups(tp=1)
    exchange_checks(groups.ep_comm, groups.ep_group, device)
    return True


@pytest.mark.gpu(2)
def test_subgroups_on_an_eager_nccl_group(worlds, tmp_path):
    world = min(4, cuda_count())
    assert worlds.run(world, _on_eager_nccl, str(tmp_path), deadline_s=240) == [True] * world
