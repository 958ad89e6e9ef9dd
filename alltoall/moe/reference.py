"""The dense single-process oracle the tests compare against: plain PyTorch,
plain loops, no alltoall kernel and no communication. Slow on purpose.

``ReferenceMoE`` holds all E experts. Fed one rank's tokens, it must give
what ``MoE`` gives on that rank, with the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def reference_node_limited_top_k(logits: torch.Tensor, k: int, expert_node: Sequence[int],
                                 max_nodes: int) -> torch.Tensor:
    """``[S, k]`` experts under DeepSeek-V3's node-limited rule, token by
    token in plain Python (alltoall/moe/node_limited.py states the rule):
    node score = sum of its ``max(1, k // max_nodes)`` best softmax
    probabilities, the ``max_nodes`` best nodes (lower id among equals), then
    the k best logits among their experts (lower expert among equals)."""
    probs = torch.softmax(logits, dim=1)
    nodes = sorted(set(int(n) for n in expert_node))
    per_node = max(1, k // max_nodes)
    chosen = []
    for s in range(logits.shape[0]):
        row = [float(v) for v in probs[s]]
        score = {}
        for n in nodes:
            best = sorted((row[e] for e in range(len(row)) if expert_node[e] == n), reverse=True)[:per_node]
            total = 0.0
            for value in best:
                total += value
            score[n] = total
        kept = sorted(nodes, key=lambda n: (-score[n], n))[:max_nodes]
        candidates = [e for e in range(len(row)) if expert_node[e] in kept]
        candidates.sort(key=lambda e: (-float(logits[s, e]), e))
        chosen.append(candidates[:k])
    return torch.tensor(chosen, dtype=torch.int64).reshape(logits.shape[0], k)


def reference_route(logits: torch.Tensor, k: int, capacity: int | None,
                    expert_index: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``(expert_index [S, k], dest_row [S, k], source [R], counts [E])`` as
    ``torch.ops.alltoall.moe_route`` documents them, by walking the
    assignments in priority order (choice, then token). ``expert_index``
    given: those choices instead of the plain top-k (node-limited routing)."""
    tokens, experts = logits.shape
    if expert_index is None:
        # A stable descending sort keeps the lower expert first among equal logits.
        expert_index = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k].contiguous()
    counts = torch.bincount(expert_index.reshape(-1), minlength=experts)
    if capacity is None:
        base = [int(v) for v in torch.cumsum(counts, 0) - counts]
        rows = tokens * k
    else:
        base = [e * capacity for e in range(experts)]
        rows = experts * capacity
    dest_row = torch.full((tokens, k), -1, dtype=torch.int64)
    source = torch.full((rows,), -1, dtype=torch.int64)
    used = [0] * experts
    for j in range(k):
        for s in range(tokens):
            e = int(expert_index[s, j])
            slot = used[e]
            used[e] += 1
            if capacity is not None and slot >= capacity:
                continue
            dest_row[s, j] = base[e] + slot
            source[base[e] + slot] = s * k + j
    return expert_index, dest_row, source, counts


def reference_dispatch(x: torch.Tensor, dest_row: torch.Tensor, rows: int,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[S, M] -> [rows, M]``: each kept assignment's (weighted) token at its row."""
    out = x.new_zeros((rows, x.shape[1]))
    for s in range(dest_row.shape[0]):
        for j in range(dest_row.shape[1]):
            r = int(dest_row[s, j])
            if r >= 0:
                out[r] = x[s] if weights is None else weights[s, j] * x[s]
    return out


def reference_combine(rows: torch.Tensor, dest_row: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, M] -> [S, M]``: each token's sum of its kept (weighted) rows."""
    out = rows.new_zeros((dest_row.shape[0], rows.shape[1]))
    for s in range(dest_row.shape[0]):
        for j in range(dest_row.shape[1]):
            r = int(dest_row[s, j])
            if r >= 0:
                out[s] = out[s] + (rows[r] if weights is None else weights[s, j] * rows[r])
    return out


class ReferenceMoE(nn.Module):
    """All E experts on one process; the same maths as ``MoE``.

    Args:
        gate_weight: ``[E, M]``, the router (no bias).
        experts: the E experts, in global order.
        k, capacity: choices per token, and rows per expert (None: dropless).
        normalize_weights: None means k > 1, as in ``TopKGate``.
        z_loss_coef: weight of the z-loss inside aux.
        mlp, coefficient: the PR-MoE residual MLP and its 2-way mixer, or None.
        expert_node, max_nodes: node-limited routing (``reference_node_limited_top_k``);
            None: plain top-k.
    """

    def __init__(self, gate_weight: torch.Tensor, experts: Sequence[nn.Module], k: int, capacity: int | None, *,
                 normalize_weights: bool | None = None, z_loss_coef: float = 0.0,
                 mlp: nn.Module | None = None, coefficient: nn.Module | None = None,
                 expert_node: Sequence[int] | None = None, max_nodes: int | None = None) -> None:
        super().__init__()
        self.gate_weight = nn.Parameter(gate_weight.detach().clone())
        self.experts = nn.ModuleList(experts)
        self.k = k
        self.capacity = capacity
        self.normalize_weights = k > 1 if normalize_weights is None else normalize_weights
        self.z_loss_coef = z_loss_coef
        self.mlp = mlp
        self.coefficient = coefficient
        self.expert_node = None if expert_node is None else [int(n) for n in expert_node]
        self.max_nodes = max_nodes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[S, M] -> (output [S, M], aux_loss, counts [E])``."""
        tokens, num_experts = x.shape[0], len(self.experts)
        dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), self.gate_weight.dtype)
        logits = x.to(dtype) @ self.gate_weight.to(dtype).t()
        probs = torch.softmax(logits, dim=1)
        chosen = None
        if self.max_nodes is not None and self.expert_node is not None and tokens:
            chosen = reference_node_limited_top_k(logits.detach(), self.k, self.expert_node, self.max_nodes)
        expert_index, dest_row, _, counts = reference_route(logits.detach(), self.k, self.capacity, chosen)
        weights = probs.gather(1, expert_index)
        if self.normalize_weights:
            weights = weights / weights.sum(dim=1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(num_experts):
            kept = (expert_index == e) & (dest_row >= 0)
            s, j = kept.nonzero(as_tuple=True)
            if s.numel():
                out = out.index_add(0, s, weights[s, j].to(x.dtype)[:, None] * self.experts[e](x[s]))
        if self.mlp is not None and self.coefficient is not None:
            mix = torch.softmax(self.coefficient(x), dim=-1)
            out = out * mix[:, 0:1] + self.mlp(x) * mix[:, 1:]
        if tokens == 0:
            aux = probs.sum() * 0
        else:
            fraction = counts.to(dtype) / (tokens * self.k)
            aux = num_experts * (probs.mean(dim=0) * fraction).sum()
            if self.z_loss_coef:
                aux = aux + self.z_loss_coef * (torch.logsumexp(logits, dim=1) ** 2).mean()
        return out, aux, counts
