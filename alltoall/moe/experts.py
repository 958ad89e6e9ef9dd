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

    def forward(self, rows: torch.Tensor, rows_per_expert: Sequence[int]) -> torch.Tensor:
        if len(rows_per_expert) != len(self.experts) or sum(rows_per_expert) != rows.shape[0]:
            raise ValueError(f"rows_per_expert={list(rows_per_expert)} does not split {rows.shape[0]} rows among "
                             f"{len(self.experts)} experts")
        blocks = rows.split(list(rows_per_expert))
        return torch.cat([expert(block) for expert, block in zip(self.experts, blocks, strict=True)])
