"""Top-k softmax gating: the capacity rule, the mapping table, the combine
weights and the auxiliary losses (load balancing, router z-loss)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from alltoall.moe.dispatch import Routing, route
from alltoall.moe.node_limited import check_node_map, limit_logits


def expert_capacity(tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """Rows per expert in the padded buffer:
    ``min(tokens, max(min_capacity, ceil(k * tokens * capacity_factor / num_experts)))``.

    ``k * tokens / num_experts`` is the mean load of an expert. For k = 1 and
    2 this is DeepSpeed's rule (its top-2 gate doubles the factor); for k > 2
    DeepSpeed takes ``k * ceil(...)``, which can be up to k - 1 rows more. It
    never exceeds ``tokens``, since an expert gets at most one assignment per
    token, so ``min_capacity`` only pads up to that. Computed in float64.
    """
    if tokens < 0 or num_experts < 1 or not 1 <= k <= num_experts:
        raise ValueError(f"expert_capacity: need tokens >= 0 and 1 <= k <= num_experts, got tokens={tokens}, "
                         f"k={k}, num_experts={num_experts}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
    if min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity} must be >= 0")
    return min(tokens, max(min_capacity, math.ceil(k * tokens * capacity_factor / num_experts)))


@dataclass(frozen=True)
class GateOutput:
    """What the gate decides for S local tokens.

    Attributes:
        routing: the mapping table (see ``alltoall.moe.dispatch.Routing``).
        weights: ``[S, k]`` combine weights, differentiable, in the gate's dtype
            (float32, or float64 for float64 input). A dropped choice keeps its
            weight here but contributes nothing.
        aux_loss: scalar, the load-balancing loss plus ``z_loss_coef`` times the z-loss.
        balance_loss: scalar, ``E * sum_e f_e * P_e``.
        z_loss: scalar, ``mean_s logsumexp(logits_s) ** 2``, differentiable.
            With ``z_loss_coef=0`` it is not part of ``aux_loss`` and is
            computed on first access (the same value and graph; its ops are
            host time on every step otherwise).
        counts: ``[E]`` int64, assignments per expert before dropping (detached).
    """

    routing: Routing
    weights: torch.Tensor
    aux_loss: torch.Tensor
    balance_loss: torch.Tensor
    lazy_z_loss: torch.Tensor | Callable[[], torch.Tensor] = field(repr=False)
    counts: torch.Tensor

    @property
    def z_loss(self) -> torch.Tensor:
        if callable(self.lazy_z_loss):
            object.__setattr__(self, "lazy_z_loss", self.lazy_z_loss())
        return self.lazy_z_loss  # type: ignore[return-value]


class TopKGate(nn.Module):
    """Softmax over ``E`` experts, the k best per token, and the losses.

    Args:
        hidden_size: M, the token width.
        num_experts: E.
        k: choices per token, 1 <= k <= E.
        normalize_weights: rescale each token's k weights to sum to 1 (before
            any dropping). Default: True for k > 1 (GShard), False for k = 1
            (Switch: the weight is the softmax probability).
        z_loss_coef: weight of the router z-loss inside ``aux_loss``; 0 disables it.
        max_nodes: node-limited routing (DeepSeek-V3): each token takes its k
            experts among the experts of its ``max_nodes`` best nodes, a
            node's score being the sum of its ``max(1, k // max_nodes)``
            highest softmax probabilities (``alltoall.moe.node_limited``).
            None, or at least the number of nodes: plain top-k, bit for bit.
        expert_node: ``[E]`` the node id (0 .. n-1) of every expert; needed
            with ``max_nodes``. ``alltoall.moe.node_limited.expert_nodes``
            builds it from a Communicator.

    The logits are computed in float32 (float64 for float64 input), whatever
    the activations' dtype, as DeepSpeed does.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int = 1,
        *,
        normalize_weights: bool | None = None,
        z_loss_coef: float = 0.0,
        max_nodes: int | None = None,
        expert_node: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
        if z_loss_coef < 0:
            raise ValueError(f"z_loss_coef={z_loss_coef} must be >= 0")
        self.num_experts = num_experts
        self.k = k
        self.normalize_weights = k > 1 if normalize_weights is None else normalize_weights
        self.z_loss_coef = z_loss_coef
        if max_nodes is not None and expert_node is None:
            raise ValueError(f"max_nodes={max_nodes} needs expert_node, the node of every expert")
        self.max_nodes = max_nodes
        # A plain tensor, not a buffer: it describes the placement, not the model, so it stays out of state_dict.
        self.expert_node = None if expert_node is None else check_node_map(expert_node, num_experts, k, max_nodes)
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[S, M] -> [S, E]`` in float32 (float64 for float64 input or weights)."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), self.wg.weight.dtype)
        return nn.functional.linear(x.to(dtype), self.wg.weight.to(dtype))

    def choice_scores(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``[S, E]`` scores whose top-k (larger first, the lower expert among
        equals) are the chosen experts: the logits, with the experts outside
        a token's ``max_nodes`` best nodes at -inf. A subclass may choose
        otherwise (the benchmarks draw the routing); the weights and losses
        still come from ``probs``."""
        return limit_logits(logits, probs, self.expert_node, self.k, self.max_nodes)

    def forward(self, x: torch.Tensor, capacity: int | None) -> GateOutput:
        """Gates tokens ``x`` ``[S, M]``; ``capacity`` None means dropless."""
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=1)
        routing = route(self.choice_scores(logits, probs), self.k, capacity)
        weights = probs.gather(1, routing.expert_index)
        if self.normalize_weights:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        balance = load_balancing_loss(probs, routing.counts, self.k)
        if self.z_loss_coef:
            z: torch.Tensor | Callable[[], torch.Tensor] = router_z_loss(logits)
            aux = balance + self.z_loss_coef * z
        else:
            z, aux = functools.partial(router_z_loss, logits), balance
        return GateOutput(routing, weights, aux, balance, z, routing.counts.detach())


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """GShard/Switch auxiliary loss ``E * sum_e f_e * P_e``.

    ``P_e`` is the mean router probability of expert e over the S tokens and
    ``f_e`` the fraction of the ``S * k`` assignments that chose e, before
    any dropping (counts are not differentiable; the gradient flows through
    P). 1 when perfectly balanced; 0 for no tokens. DeepSpeed's top-2 gate
    counts only first choices in ``f``; this counts all k.
    """
    tokens, experts = probs.shape
    if tokens == 0:
        return probs.sum() * 0
    f = counts.to(probs.dtype) / (tokens * k)
    return experts * (probs.mean(dim=0) * f).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss ``mean_s (logsumexp_e logits[s, e]) ** 2``; 0 for no tokens."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    return torch.logsumexp(logits, dim=1).square().mean()
