"""The experts that live on this rank, run one contiguous row block each."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


class FeedForward(nn.Module):
    """The default expert: ``Linear(M, F) -> GELU -> Linear(F, M)``, ``[N, M] -> [N, M]``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def seeded_feed_forwards(hidden_size: int, ffn_hidden_size: int, seed: int, indices: Sequence[int]) -> list[nn.Module]:
    """One FeedForward per global expert index, each initialised from its own
    generator (``seed + index``), so expert e starts the same whatever the
    number of ranks it is spread over. The global RNG is left untouched."""
    experts = []
    for e in indices:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + e)
            experts.append(FeedForward(hidden_size, ffn_hidden_size))
    return experts


def replicas(expert: nn.Module, count: int) -> list[nn.Module]:
    """``count`` deep copies of ``expert``, all with its current weights (as
    DeepSpeed does)."""
    return [copy.deepcopy(expert) for _ in range(count)]


class LocalExperts(nn.Module):
    """The experts with global indices ``first, first + 1, ...`` of one rank.

    ``forward(rows, rows_per_expert)`` takes the rows grouped by local expert
    (``rows_per_expert[i]`` consecutive rows for local expert i) and returns
    each block passed through its expert, in the same layout: ``[N, M] -> [N, M]``.
    """

    def __init__(self, experts: Sequence[nn.Module], first: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.first = first

    @property
    def global_indices(self) -> range:
        return range(self.first, self.first + len(self.experts))

    def forward(self, rows: torch.Tensor, rows_per_expert: Sequence[int], *, batched: bool = False) -> torch.Tensor:
        """``batched=True``: the blocks are equal by construction (the padded
        buffer), on every rank alike; plain FeedForward experts then run as
        one batched matmul per layer (see ``_batched_feed_forward``). The
        caller decides, not the counts, so that every rank of a TP group
        builds the same graph and its gradient hooks fire in the same order."""
        if len(rows_per_expert) != len(self.experts) or sum(rows_per_expert) != rows.shape[0]:
            raise ValueError(f"rows_per_expert={list(rows_per_expert)} does not split {rows.shape[0]} rows among "
                             f"{len(self.experts)} experts")
        if batched and len(self.experts) > 1 and rows.dim() == 2 and rows.shape[0] and _equal(rows_per_expert) \
                and _batchable(self.experts, rows):
            count = len(self.experts)
            out = _batched_feed_forward(self.experts, rows.reshape(count, rows.shape[0] // count, rows.shape[1]))
            return out.view(rows.shape[0], -1)
        blocks = rows.split(list(rows_per_expert))
        return torch.cat([expert(block) for expert, block in zip(self.experts, blocks, strict=True)])

    def forward_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``blocks [L, N, M]``, block i for local expert i -> ``[L, N, M]``:
        ``forward(blocks.reshape(L * N, M), [N] * L, batched=True)`` without
        the reshapes (the padded buffer's path, whose blocks are equal on
        every rank)."""
        if blocks.dim() != 3 or blocks.shape[0] != len(self.experts):
            raise ValueError(f"blocks of shape {tuple(blocks.shape)} are not [{len(self.experts)}, rows, hidden]")
        if len(self.experts) > 1 and blocks.shape[1] and _batchable(self.experts, blocks):
            return _batched_feed_forward(self.experts, blocks)
        return torch.stack([expert(block) for expert, block in zip(self.experts, blocks, strict=True)])


# The batched path. With equal blocks (the padded, capacity-limited buffer)
# and plain FeedForward experts, one baddbmm per layer over the experts'
# stacked weights computes what the per-expert loop does, bit for bit on
# the CPU (tests/unit/test_moe_layer.py), with a third fewer ops and no
# module calls: at small shapes the layer's host work is its cost (issue 21,
# item 3). The parameters stay the experts' own (state_dict, hooks on them,
# optimizers); stacking copies them per call, which is cheap next to the
# matmuls. Anything else (other expert types, module hooks, mixed dtypes or
# devices, uneven blocks) takes the loop.


def _equal(counts: Sequence[int]) -> bool:
    first = counts[0]
    return all(c == first for c in counts)


def _no_module_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _batchable(experts: nn.ModuleList, rows: torch.Tensor) -> bool:
    if _global_module_hooks():
        return False
    for expert in experts:
        if type(expert) is not FeedForward:
            return False
        fc1, fc2 = expert.fc1, expert.fc2
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or fc1.bias is None or fc2.bias is None:
            return False
        if not (_no_module_hooks(expert) and _no_module_hooks(fc1) and _no_module_hooks(fc2)):
            return False
        for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias):
            if p.dtype != rows.dtype or p.device != rows.device:
                return False
    first = experts[0]
    shapes = (first.fc1.weight.shape, first.fc2.weight.shape)
    return all((e.fc1.weight.shape, e.fc2.weight.shape) == shapes for e in experts)


def _global_module_hooks() -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def _batched_feed_forward(experts: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """``x [L, N, M]``: block i through FeedForward i, ``[L, N, M]``."""
    fc1 = [e.fc1 for e in experts]
    fc2 = [e.fc2 for e in experts]
    w1 = torch.stack([f.weight for f in fc1]).transpose(1, 2)
    h = torch.baddbmm(torch.stack([f.bias for f in fc1]).unsqueeze(1), x, w1)
    w2 = torch.stack([f.weight for f in fc2]).transpose(1, 2)
    return torch.baddbmm(torch.stack([f.bias for f in fc2]).unsqueeze(1), nn.functional.gelu(h), w2)
