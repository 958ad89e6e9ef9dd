"""The MoE layer with expert parallelism on gloo ranks against the dense
single-process reference with the same weights: outputs, aux loss, counts
and gradients, for drop and dropless, k = 1, 2, 4, flat and hierarchical
exchanges; a short training run at world 4 against world 1."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.moe import MoE
from tests.harness.moe_checks import HIDDEN, check_against_reference

FFN = 10


def _layer_matches_reference(local_size: int) -> tuple[int, bool]:
    world = dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    num_experts = max(4, 2 * world)
    checked, dropped = 0, False
    for drop, k, algorithm in itertools.product([True, False], [1, 2, 4], ["flat", "hierarchical"]):
        torch.manual_seed(10 * k + drop)  # the same replicated weights on every rank
        layer = MoE(HIDDEN, num_experts=num_experts, k=k, ffn_hidden_size=FFN, drop_tokens=drop, min_capacity=1,
                    use_residual=k == 2, router_z_loss_coef=0.01, ep_group=comm, algorithm=algorithm,
                    dispatcher="replicate").double()  # the dedup path: test_moe_dispatchers.py
        # Capacity needs equal token counts; dropless also takes uneven ones, and none at all on the last rank.
        tokens_of = [12] * world if drop else [3 + 4 * r for r in range(world - 1)] + [0 if world > 1 else 5]
        dropped |= check_against_reference(layer, None, tokens_of, seed=checked)
        checked += 1
    return checked, dropped


@pytest.mark.parametrize("world,local_size", [(1, 1), (2, 1), (4, 2), (8, 4)])
def test_layer_matches_dense_reference(worlds, world, local_size):
    results = worlds.run(world, _layer_matches_reference, local_size, deadline_s=300)
    assert all(checked == 12 for checked, _ in results)
    assert any(dropped for _, dropped in results), "no configuration dropped a token"


def _tensor_and_expert_parallel(tp: int, ep: int, local_size: int) -> tuple[int, bool]:
    groups = alltoall.ParallelGroups(tp, ep, local_size=local_size)
    num_experts = 2 * ep
    checked, dropped = 0, False
    for drop, k, algorithm in itertools.product([True, False], [1, 2], ["flat", "hierarchical"]):
        torch.manual_seed(20 * k + drop)  # the same replicated weights on every rank
        layer = MoE(HIDDEN, num_experts=num_experts, k=k, ffn_hidden_size=FFN, drop_tokens=drop, min_capacity=1,
                    use_residual=k == 2, router_z_loss_coef=0.01, groups=groups, algorithm=algorithm,
                    dispatcher="replicate").double()
        assert layer.ep_size == ep
        assert list(layer.experts.global_indices) == [2 * groups.ep_rank, 2 * groups.ep_rank + 1]
        # One batch per TP group (its ranks hold it replicated), uneven when dropless.
        tokens_of = [10] * ep if drop else [3 + 5 * e for e in range(ep - 1)] + [0]
        seed = 100 * groups.dp_rank + checked
        dropped |= check_against_reference(layer, groups.ep_group, tokens_of, seed, me=groups.ep_rank)
        checked += 1
    return checked, dropped


@pytest.mark.parametrize("tp,ep,local_size", [(2, 4, 4), (4, 2, 4), (2, 2, 2)])
def test_tensor_and_expert_parallel_layer_matches_dense_reference(worlds, tp, ep, local_size):
    results = worlds.run(8, _tensor_and_expert_parallel, tp, ep, local_size, deadline_s=300)
    assert all(checked == 8 for checked, _ in results)
    assert any(dropped for _, dropped in results), "no configuration dropped a token"


def _expert_parallel_subgroups() -> None:
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # ep = 2, two data-parallel replicas
    group = groups[rank // 2]
    torch.manual_seed(5)
    layer = MoE(HIDDEN, num_experts=4, k=2, ffn_hidden_size=FFN, ep_group=group).double()
    assert (layer.ep_size, layer.num_local_experts, list(layer.experts.global_indices)) == (2, 2, [2 * (rank % 2),
                                                                                                  2 * (rank % 2) + 1])
    check_against_reference(layer, group, [8, 8], seed=rank // 2)
    torch.manual_seed(5)
    default = MoE(HIDDEN, num_experts=4, k=1, ffn_hidden_size=FFN, drop_tokens=False).double()
    assert default.ep_size == 4
    check_against_reference(default, None, [2, 0, 5, 1], seed=7)


def test_expert_parallel_subgroups_and_default_group(worlds):
    worlds.run(4, _expert_parallel_subgroups)


def _bad_configuration() -> None:
    comm = alltoall.Communicator(topology=alltoall.Topology.from_node_ids([0, 0, 1], dist.get_rank()))
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by the expert-parallel size 3"):
        MoE(HIDDEN, num_experts=4, ffn_hidden_size=FFN, ep_group=comm)
    with pytest.raises(ValueError, match="algorithm='hierarchical' needs nodes of equal size"):
        MoE(HIDDEN, num_experts=3, ffn_hidden_size=FFN, ep_group=comm, algorithm="hierarchical")
    with pytest.raises(ValueError, match="algorithm='ring'"):
        MoE(HIDDEN, num_experts=3, ffn_hidden_size=FFN, ep_group=comm, algorithm="ring")


def test_bad_configuration_raises_at_construction(worlds):
    worlds.run(3, _bad_configuration, deadline_s=60)


def _uneven_tokens_with_capacity() -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = MoE(HIDDEN, num_experts=3, ffn_hidden_size=FFN, check_tokens=True)
    with pytest.raises(ValueError, match=r"hold between 8 and 10 \(this rank: " + str(8 + rank) + r"\)"):
        layer(torch.randn(8 + rank, HIDDEN))
    layer(torch.randn(8, HIDDEN))  # still in step: equal counts go through


def test_uneven_tokens_with_capacity_raise_on_every_rank(worlds):
    worlds.run(3, _uneven_tokens_with_capacity, deadline_s=60)


# Training --------------------------------------------------------------------

STEPS, GLOBAL_TOKENS = 25, 96


def _train(seed: int, aux_coef: float) -> list[float]:
    """Trains MoE + a linear head on y = x W_teacher; returns the task
    loss (global mean) after every step. Each rank takes a slice of the same
    global batch; the loss is written so its sum over ranks is the world-1
    loss, hence replicated gradients are summed over ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    layer = MoE(8, num_experts=4, k=2, ffn_hidden_size=16, drop_tokens=False, use_residual=True).double()
    head = torch.nn.Linear(8, 4).double()
    params = [*layer.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    data = torch.Generator().manual_seed(seed + 1)
    teacher = torch.randn(8, 4, generator=data, dtype=torch.float64)
    per_rank = GLOBAL_TOKENS // world
    losses = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_TOKENS, 8, generator=data, dtype=torch.float64)
        y = x @ teacher
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        out, aux, _ = layer(x[mine])
        task = ((head(out) - y[mine]) ** 2).sum() / (GLOBAL_TOKENS * 4)
        opt.zero_grad()
        (task + aux_coef * aux / world).backward()
        replicated = [p for n, p in layer.named_parameters() if not n.startswith("experts.")] + list(head.parameters())
        for p in replicated:
            dist.all_reduce(p.grad)
        opt.step()
        reported = task.detach().clone()
        dist.all_reduce(reported)
        losses.append(float(reported))
    return losses


@pytest.mark.parametrize("aux_coef", [0.0, 0.01])
def test_training_at_world_4_follows_world_1(worlds, aux_coef):
    single = worlds.run(1, _train, 3, aux_coef)[0]
    four = worlds.run(4, _train, 3, aux_coef)
    assert all(curve == four[0] for curve in four)
    late = sum(four[0][-5:]) / 5
    assert late < 0.25 * four[0][0], f"the loss did not go down: {four[0][0]:.4f} -> {late:.4f} (last 5 steps)"
    if aux_coef == 0:
        # Dropless routing is per token, so without the aux loss the run is the same computation.
        torch.testing.assert_close(torch.tensor(four[0]), torch.tensor(single), rtol=1e-9, atol=1e-12)
    else:
        # The aux loss uses each rank's own token statistics, so the paths drift apart slightly.
        torch.testing.assert_close(torch.tensor(four[0]), torch.tensor(single), rtol=1e-2, atol=0)
