"""The token-to-expert mapping table and the differentiable dispatch and
combine over it (torch.ops.alltoall.moe_*, csrc/kernels/moe_element.h).

Assignment ``a = s * k + j`` is token s's j-th choice, best first. The table
has two views of the same assignments: ``dest_row[s, j]``, the buffer row an
assignment occupies (-1 when dropped), and ``source[r]``, the assignment in
buffer row r (-1 for padding). Dispatch gathers rows by ``source``, combine
by ``dest_row``; each is the other's adjoint, so the backward of one is the
other, and the gate-weight gradient is a row-wise dot product. Their
autograd is C++ (csrc/ops/moe_autograd.cpp). No one-hot ``[S, E, C]``
tensor is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alltoall._library import _C  # noqa: F401  (registers torch.ops.alltoall)

_ops = torch.ops.alltoall


@dataclass(frozen=True)
class Routing:
    """Where every (token, choice) assignment goes.

    Attributes:
        expert_index: ``[S, k]`` int64, the chosen experts, best first.
        dest_row: ``[S, k]`` int64, the buffer row of each assignment, -1 when dropped.
        source: ``[R]`` int64, the assignment in each buffer row, -1 for padding.
        counts: ``[E]`` int64, assignments per expert before dropping.
        capacity: rows per expert in the padded ``[E * capacity, M]`` buffer, or
            None for the compact dropless buffer (``R = S * k``, expert-major,
            expert e holding ``counts[e]`` rows).
    """

    expert_index: torch.Tensor
    dest_row: torch.Tensor
    source: torch.Tensor
    counts: torch.Tensor
    capacity: int | None

    @property
    def k(self) -> int:
        return self.dest_row.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_rows(self) -> int:
        return self.source.shape[0]


def route(logits: torch.Tensor, k: int, capacity: int | None) -> Routing:
    """Top-k, per-expert prefix sums and the scatter into the mapping table,
    in one kernel pass over ``logits`` ``[S, E]``.

    Slots follow priority order: all first choices (in token order) before
    any second choice, and so on; with a capacity, the assignments whose slot
    is ``>= capacity`` are dropped. Ties between equal logits go to the lower
    expert index. Not differentiable (the weights are, see ``TopKGate``).
    """
    expert_index, dest_row, source, counts = _ops.moe_route(logits.detach(), k, -1 if capacity is None else capacity)
    return Routing(expert_index, dest_row, source, counts, capacity)


def dispatch(x: torch.Tensor, routing: Routing, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens ``[S, M]`` to the expert-major buffer ``[R, M]``: row r holds
    the token of assignment ``source[r]`` (times its weight, when given),
    zeros for padding. Differentiable in ``x`` and ``weights``."""
    return _ops.moe_dispatch(x, routing.source, routing.dest_row, weights)


def combine(rows: torch.Tensor, routing: Routing, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Buffer ``[R, M]`` back to tokens ``[S, M]``: token s gets the sum over
    its kept choices j of ``weights[s, j] * rows[dest_row[s, j]]`` (weight 1
    when None). Differentiable in ``rows`` and ``weights``; ``weights`` must
    have the rows' dtype."""
    return _ops.moe_combine(rows, routing.source, routing.dest_row, weights)
