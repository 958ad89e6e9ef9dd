"""Helpers for the MoE tests: the dense reference with a layer's weights."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from alltoall.moe import MoE
from alltoall.moe.experts import FeedForward
from alltoall.moe.reference import ReferenceMoE
from tests.harness.checks import rank_input

HIDDEN = 6


def reference_like(layer: MoE, experts: Sequence[nn.Module], tokens: int) -> ReferenceMoE:
    """A ReferenceMoE with copies of ``layer``'s gate and residual and of
    ``experts`` (all E, in global order), at the capacity ``layer`` uses for
    ``tokens`` local tokens in its current mode."""
    residual = layer.use_residual
    return ReferenceMoE(
        layer.gate.wg.weight,
        [copy.deepcopy(e) for e in experts],
        layer.k,
        layer.capacity(tokens),
        normalize_weights=layer.gate.normalize_weights,
        z_loss_coef=layer.gate.z_loss_coef,
        mlp=copy.deepcopy(layer.mlp) if residual else None,
        coefficient=copy.deepcopy(layer.coefficient) if residual else None,
        expert_node=None if layer.gate.expert_node is None else layer.gate.expert_node.tolist(),
        max_nodes=layer.gate.max_nodes,
    )


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name; zeros where none was produced."""
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in module.named_parameters()}


def all_experts(layer: MoE, group: dist.ProcessGroup | None) -> list[FeedForward]:
    """Every rank's local experts, gathered, in global order."""
    mine = {e: m.state_dict() for e, m in zip(layer.experts.global_indices, layer.experts.experts, strict=True)}
    gathered: list[dict] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(gathered, mine, group=group)
    states = {e: s for part in gathered for e, s in part.items()}
    experts = []
    for e in range(layer.num_experts):
        expert = FeedForward(layer.hidden_size, layer.experts.experts[0].fc1.out_features).double()
        expert.load_state_dict(states[e])
        experts.append(expert)
    return experts


def check_against_reference(layer: MoE, group: dist.ProcessGroup | None, tokens_of: list[int], seed: int,
                             me: int | None = None) -> bool:
    """Runs ``layer`` on this rank's tokens, the reference on every rank's of
    ``group``, and compares; returns whether this rank dropped any token.

    ``me`` is this rank's data index in ``group`` (default its rank there);
    with tensor parallelism it is the EP coordinate, shared by a TP group.
    """
    rank = dist.get_rank(group) if me is None else me
    size = len(tokens_of)
    inputs = [rank_input(r, tokens_of[r], (HIDDEN,), torch.float64, seed) for r in range(size)]
    probes = [rank_input(r, tokens_of[r], (HIDDEN,), torch.float64, seed + 1) for r in range(size)]

    x = inputs[rank].clone().requires_grad_()
    out, aux, counts = layer(x)
    ((out * probes[rank]).sum() + 0.3 * aux).backward()

    reference = reference_like(layer, all_experts(layer, group), tokens_of[rank])
    total = torch.zeros((), dtype=torch.float64)
    for r in range(size):
        xr = inputs[r].clone().requires_grad_(r == rank)
        out_r, aux_r, counts_r = reference(xr)
        total = total + (out_r * probes[r]).sum() + 0.3 * aux_r
        if r == rank:
            x_ref, expected = xr, (out_r, aux_r, counts_r)
    total.backward()

    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(aux, expected[1])
    assert torch.equal(counts, expected[2])
    torch.testing.assert_close(x.grad, x_ref.grad)
    ours, ref = grads_of(layer), grads_of(reference)
    # Replicated parameters: the sum over the group of the local gradients.
    for name in [n for n in ours if not n.startswith("experts.")]:
        dist.all_reduce(ours[name], group=group)
        torch.testing.assert_close(ours[name], ref["gate_weight" if name == "gate.wg.weight" else name], msg=name)
    # Experts: each owner already holds the gradient from every rank's tokens
    # (with TP, summed over its TP group by the layer).
    for i, e in enumerate(layer.experts.global_indices):
        for name, p in layer.experts.experts[i].named_parameters():
            torch.testing.assert_close(p.grad, ref[f"experts.{e}.{name}"], msg=f"expert {e} {name}")
    capacity = layer.capacity(tokens_of[rank])
    return capacity is not None and bool((counts > capacity).any())
