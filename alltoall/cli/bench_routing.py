"""Routing drawn from a seed, for the benchmarks: the same routing for every
dispatcher in a run, uniform or skewed.

Each token's k experts are drawn without replacement from a popularity
distribution over the E experts (the Gumbel-top-k trick: the k best of
``log p_e + Gumbel noise``). ``uniform``: every expert equally likely.
``zipf``: ``p_e`` proportional to ``1 / r_e ** exponent``, ``r_e`` expert e's
place (1 .. E) in a permutation drawn from the seed, so the hot experts are
spread over the ranks instead of all on rank 0. The noise of rank r comes
from ``seed`` and r, the permutation from ``seed`` alone: every rank draws
its own tokens from the same distribution, and a run is reproducible.

The drawn scores replace the gate's choice, not its weights:
``DrawnRoutingGate`` is a ``TopKGate`` whose chosen experts are the top-k of
the drawn scores (after node-limited routing, when the gate has
``max_nodes``), with the usual capacity rule; its combine weights and losses
still come from its own logits, so the backward is a real gate's.
"""

from __future__ import annotations

import torch

from alltoall.moe.gate import TopKGate
from alltoall.moe.node_limited import limit_logits

DISTRIBUTIONS = ("uniform", "zipf")


def popularity(num_experts: int, distribution: str, exponent: float, seed: int) -> torch.Tensor:
    """``[E]`` float64 probabilities summing to 1."""
    if distribution == "uniform":
        return torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    if distribution != "zipf":
        raise ValueError(f"routing distribution {distribution!r} is not one of {DISTRIBUTIONS}")
    if not exponent >= 0:
        raise ValueError(f"zipf exponent={exponent} must be >= 0")
    place = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed)).to(torch.float64) + 1
    weights = place.pow(-exponent)
    return weights / weights.sum()


def drawn_scores(tokens: int, num_experts: int, distribution: str = "uniform", exponent: float = 1.2,
                 seed: int = 0, rank: int = 0) -> torch.Tensor:
    """``[tokens, E]`` float64 scores whose top-k is a draw of k distinct
    experts per token from ``popularity``."""
    log_p = popularity(num_experts, distribution, exponent, seed).log()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
    uniform = torch.rand(tokens, num_experts, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    return log_p - torch.log(-torch.log(uniform))


class DrawnRoutingGate(TopKGate):
    """A TopKGate that routes by drawn scores ``[S, E]`` (``drawn_scores``)
    instead of its logits; built from ``gate``, sharing its router weight.
    Its input must have S tokens."""

    def __init__(self, gate: TopKGate, scores: torch.Tensor) -> None:
        with torch.random.fork_rng(devices=[]):  # the placeholder router below must not move the global RNG
            super().__init__(gate.wg.in_features, gate.num_experts, gate.k, normalize_weights=gate.normalize_weights,
                             z_loss_coef=gate.z_loss_coef, max_nodes=gate.max_nodes, expert_node=gate.expert_node)
        self.wg = gate.wg
        self.scores = scores

    def choice_scores(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.scores.shape != logits.shape:
            raise ValueError(f"drawn routing of shape {tuple(self.scores.shape)} for logits of shape "
                             f"{tuple(logits.shape)}")
        scores = self.scores.to(logits.device)
        return limit_logits(scores, torch.softmax(scores, dim=1), self.expert_node, self.k, self.max_nodes)
