"""The layer with each dispatcher ("replicate", "dedup", "auto") against the
dense single-process reference: outputs, aux loss, counts, the input
gradient and every parameter gradient; drop and dropless (uneven and empty
batches), k = 1, 2 and 4, overlap_degree 1 and 3, tp 1 and 2, on emulated
nodes."""

from __future__ import annotations

import itertools

import pytest
import torch

import alltoall
from alltoall.moe import MoE
from tests.harness.moe_checks import HIDDEN, check_against_reference

FFN = 10


def _expert_parallel(local_size: int, dispatcher: str) -> tuple[int, bool, list[str]]:
    world = torch.distributed.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    num_experts = 2 * world
    checked, dropped, modes = 0, False, []
    for drop, k, overlap in itertools.product([True, False], [1, 2, 4], [1, 3]):
        torch.manual_seed(10 * k + drop + overlap)  # the same replicated weights on every rank
        layer = MoE(HIDDEN, num_experts=num_experts, k=k, ffn_hidden_size=FFN, drop_tokens=drop, min_capacity=1,
                    use_residual=k == 2, router_z_loss_coef=0.01, ep_group=comm, dispatcher=dispatcher,
                    overlap_degree=overlap).double()
        modes.append(layer.dispatcher_mode)
        tokens_of = [12] * world if drop else [3 + 4 * r for r in range(world - 1)] + [0]
        dropped |= check_against_reference(layer, None, tokens_of, seed=checked)
        checked += 1
    return checked, dropped, modes


@pytest.mark.parametrize("dispatcher", ["replicate", "dedup", "auto"])
@pytest.mark.parametrize("world,local_size", [(4, 2), (8, 4)])
def test_each_dispatcher_matches_the_dense_reference(worlds, world, local_size, dispatcher):
    results = worlds.run(world, _expert_parallel, local_size, dispatcher, deadline_s=400)
    assert all(checked == 12 for checked, _, _ in results)
    assert any(dropped for _, dropped, _ in results), "no configuration dropped a token"
    modes = [ms for _, _, ms in results]
    assert all(ms == modes[0] for ms in modes), f"ranks resolved the dispatcher differently: {modes}"
    if dispatcher != "auto":
        assert set(modes[0]) == {dispatcher}


def _tensor_parallel(dispatcher: str) -> set[str]:
    groups = alltoall.ParallelGroups(2, 2, local_size=2)  # TP pairs inside the 2 emulated nodes
    modes = set()
    for drop, k in itertools.product([True, False], [1, 2]):
        torch.manual_seed(20 * k + drop)
        layer = MoE(HIDDEN, num_experts=4, k=k, ffn_hidden_size=FFN, drop_tokens=drop, min_capacity=1,
                    use_residual=k == 2, groups=groups, dispatcher=dispatcher).double()
        modes.add(layer.dispatcher_mode)
        tokens_of = [10, 10] if drop else [7, 0]
        check_against_reference(layer, groups.ep_group, tokens_of, 100 * groups.dp_rank + k + drop,
                                me=groups.ep_rank)
    return modes


@pytest.mark.parametrize("dispatcher", ["replicate", "dedup"])
def test_tensor_parallel_with_each_dispatcher(worlds, dispatcher):
    results = worlds.run(4, _tensor_parallel, dispatcher, deadline_s=300)
    assert all(modes == {dispatcher} for modes in results)


def test_unknown_dispatcher_raises():
    with pytest.raises(ValueError, match="dispatcher='fast' is not one of"):
        MoE(HIDDEN, num_experts=2, ffn_hidden_size=FFN, dispatcher="fast")
