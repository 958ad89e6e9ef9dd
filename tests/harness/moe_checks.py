"""Helpers for the MoE tests: the dense reference with a layer's weights."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from alltoall.moe import MoE
from alltoall.moe.reference import ReferenceMoE


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
    )


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name; zeros where none was produced."""
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in module.named_parameters()}
