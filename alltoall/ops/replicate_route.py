"""The replicating dispatch: one row per kept assignment, expert-major, over
the Communicator's own all-to-all-v (flat or hierarchical). Every step is
a differentiable torch op (``index_select``, whose backward is
``index_add``, and ``Communicator.all_to_all_v``), so autograd needs no
function of its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alltoall.ops.communicator import Communicator


def _starts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


@dataclass
class ReplicateRoute:
    """Where this call's assignments go. ``token_of_row[i]``: the token of
    send row i (expert-major); ``regroup[r]``: the received row that is
    expanded row r (received rows are ``[source][local expert]`` blocks,
    expanded ones local-expert-major)."""

    comm: Communicator
    algorithm: str
    tokens: int
    token_of_row: torch.Tensor
    weight_of_row: torch.Tensor  # [n] assignment index (s * k + j) of each send row
    send: list[int]
    recv: list[int]
    regroup: torch.Tensor
    counts: torch.Tensor
    counts_list: list[int]

    @classmethod
    def build(cls, comm: Communicator, algorithm: str, expert_index: torch.Tensor, num_experts: int,
              order: list[int] | None) -> ReplicateRoute:
        """One equal all-to-all of the E per-expert counts (O(E) ints);
        ``order`` maps EP coordinates to group ranks (None: identity)."""
        tokens, k = expert_index.shape
        p = comm.size
        local = num_experts // p
        items = expert_index.reshape(-1)
        kept = (items >= 0).nonzero().squeeze(1)
        experts, by_expert = torch.sort(items[kept], stable=True)
        assignment = kept[by_expert]
        counts = torch.bincount(experts, minlength=num_experts)
        send = counts.view(p, local).sum(1).tolist()
        if p > 1:
            arrived = comm.all_to_all(counts, "flat").view(p, local)  # [source coordinate][local expert]
        else:
            arrived = counts.view(p, local)
        recv = arrived.sum(1).tolist()
        starts = _starts(arrived.reshape(-1)).view(p, local).t().reshape(-1)
        sizes = arrived.t().reshape(-1)
        total = int(sizes.sum())
        regroup = torch.repeat_interleave(starts - _starts(sizes), sizes) + torch.arange(total,
                                                                                             device=items.device)
        per_expert = arrived.sum(0)
        return cls(comm, algorithm, tokens, assignment // k, assignment, send, recv, regroup, per_expert,
                   per_expert.tolist())

    def exchange(self, rows: torch.Tensor, forward: bool) -> torch.Tensor:
        if self.comm.size == 1:
            return rows
        send, recv = (self.send, self.recv) if forward else (self.recv, self.send)
        return self.comm.all_to_all_v(rows, send, recv, self.algorithm)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[S, M]``, ``[S, k]`` -> the expanded rows ``[R, M]`` and their weights ``[R]``."""
        rows = self.exchange(x.index_select(0, self.token_of_row), True).index_select(0, self.regroup)
        w = weights.reshape(-1, 1).index_select(0, self.weight_of_row)
        return rows, self.exchange(w, True).index_select(0, self.regroup).view(-1)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """``[R, M]`` expanded rows -> ``[S, M]``, each token's sum."""
        back = torch.empty_like(self.regroup)
        back[self.regroup] = torch.arange(self.regroup.numel(), device=self.regroup.device)
        returned = self.exchange(y.index_select(0, back), False)
        return y.new_zeros((self.tokens, *y.shape[1:])).index_add(0, self.token_of_row, returned)

    def traffic(self, row_bytes: int, node_of_rank: tuple[int, ...], order: list[int] | None,
                forward: bool) -> dict[str, int]:
        """Rows and bytes to other ranks, for the flat exchange (computed
        from the splits); ``row_bytes`` includes the weight when forward."""
        me = self.comm.rank
        splits = self.send if forward else self.recv
        intra = inter = 0
        for c, n in enumerate(splits):
            peer = order[c] if order is not None else c
            if peer == me:
                continue
            if node_of_rank[peer] == node_of_rank[me]:
                intra += n
            else:
                inter += n
        return {"rows_intra": intra, "rows_inter": inter, "bytes_intra": intra * row_bytes,
                "bytes_inter": inter * row_bytes}
