"""Expert parallelism: the dispatch buffer goes to the ranks that own the
experts, through the local experts, and back.

Global expert e lives on EP rank ``e // L`` as its local expert ``e % L``
(``L = E / ep`` local experts), so the expert-major dispatch buffer already
holds one contiguous block per destination rank.

- Padded (``drop_tokens=True``): every rank sends ``[L, C, M]`` to every
  rank with the equal all-to-all; the received ``[ep, L, C, M]`` is regrouped
  to ``[L, ep * C, M]`` so each expert runs once.
- Dropless: per-expert counts are exchanged first (an equal all-to-all of
  ``E`` integers), then the rows with the all-to-all-v; the received
  ``[source rank][local expert]`` blocks are regrouped expert-major.

The way back is the mirror image. ``to_experts`` and ``from_experts`` are the
only two places that communicate rows.

With tensor parallelism (``groups``, a ParallelGroups with tp = L > 1) the
tokens, hence the dispatch buffer, are replicated across each TP group. The
rows then travel by the coordinated exchange (DeepSpeed-MoE section 5.3):
TP rank t sends only chunk t of every destination block to the ranks that
share its TP rank, the experts run on those chunks, and the way back ends
with an all-gather over the TP group that rebuilds the replicated buffer.
A chunk may cut through an expert's rows, so the rows that arrive are
regrouped by (source, local expert) pieces, which every rank can compute
from the counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from alltoall.moe.dispatch import Routing
from alltoall.moe.experts import LocalExperts
from alltoall.moe.pipeline import Pipeline, _chunk_pieces, check_overlap_degree, counts_matrix, transposed
from alltoall.ops import Communicator, ParallelGroups, wire
from alltoall.ops.coordinated import Chunking

# The profiler event around the experts' forward (bench/moe_timeline.py).
EXPERTS_EVENT = "alltoall.moe.experts forward"


def experts_event() -> contextlib.AbstractContextManager:
    """``record_function(EXPERTS_EVENT)`` while a profiler runs; nothing
    otherwise (entering and leaving the event costs two op calls per
    forward, which count at small shapes: issue 21, item 3). Under
    torch.compile always the event, as before (the check is not traceable)."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        return record_function(EXPERTS_EVENT)
    return contextlib.nullcontext()


class _GatherBlocks(torch.autograd.Function):
    """Reorders whole row blocks (``torch.ops.alltoall.gather_blocks``) that
    tile the input exactly; the backward scatters them back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, starts: list[int], counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.blocks = (starts, counts, x.shape[0])
        return torch.ops.alltoall.gather_blocks(x, starts, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        starts, counts, rows = ctx.blocks
        return torch.ops.alltoall.scatter_blocks(grad.contiguous(), starts, counts, rows), None, None


def transpose_blocks(x: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """Rows stored as blocks ``counts[a][b]`` in (a, b) order, returned in
    (b, a) order. Differentiable."""
    return _GatherBlocks.apply(x, *transposed(counts))


@dataclass(frozen=True)
class ExpertStep:
    """One forward's way through the experts: dispatch into ``routing``'s
    buffer order, ``run`` it (``[R, M]`` -> ``[R, M]``, differentiable),
    combine with the same ``routing``."""

    routing: Routing
    run: Callable[[torch.Tensor], torch.Tensor]


class ExpertExchange:
    """Runs the dispatch buffer through the experts of every EP rank.

    Args:
        comm: the EP group's Communicator, or None for a single rank (no
            communication at all). Ignored when ``groups`` is given.
        num_experts: E, divisible by the EP size.
        algorithm: "auto", "flat" or "hierarchical", for every exchange.
        groups: TP x EP groups; with tp > 1 the coordinated exchange runs.
        overlap_degree: N; above 1 the rows go in N chunks whose exchanges
            overlap the experts (alltoall.moe.pipeline).
        dispatch_dtype, combine_dtype: wire formats of the rows on their way
            to and from the experts (alltoall.ops.wire; None: the rows'
            dtype). The rows are rounded even when nothing moves (one EP
            rank), so the layer computes the same thing at every EP size.
            Gradients travel in combine_dtype both ways. Not with N > 1.
    """

    def __init__(self, comm: Communicator | None, num_experts: int, algorithm: str,
                 groups: ParallelGroups | None = None, overlap_degree: int = 1,
                 dispatch_dtype: torch.dtype | None = None, combine_dtype: torch.dtype | None = None) -> None:
        wire.check_wire_dtype(dispatch_dtype, "MoE", "dispatch_dtype")
        wire.check_wire_dtype(combine_dtype, "MoE", "combine_dtype", allowed=(torch.bfloat16,))
        self.dispatch_dtype = dispatch_dtype
        self.combine_dtype = combine_dtype
        self.overlap_degree = check_overlap_degree(overlap_degree)
        self._check_wire_overlap()
        self.groups = groups if groups is not None and groups.tp > 1 else None
        if groups is not None:
            comm = groups.ep_comm
        self.comm = comm
        self.ep = 1 if comm is None else comm.size
        # The EP coordinate: ParallelGroups relabels the EP group by it.
        self.rank = groups.ep_rank if groups is not None else (0 if comm is None else comm.rank)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {self.ep}")
        self.num_local = num_experts // self.ep
        self.algorithm = algorithm
        if comm is not None:
            comm.resolve(algorithm)  # a ValueError now rather than at the first forward

    def check_equal_tokens(self, tokens: int, device: torch.device) -> None:
        """Raises ValueError on every rank when the EP ranks hold different
        token counts, which the padded (equal) exchange cannot carry. Costs
        one exchange of one integer per peer over the EP Communicator's own
        transport (shared memory on one host), not the process group's."""
        if self.comm is None or self.ep == 1:
            return
        counts = self.comm.all_to_all(torch.full((self.ep,), tokens, dtype=torch.int64, device=device), "flat")
        most, least = int(counts.max()), int(counts.min())
        if most != least:
            raise ValueError(
                f"MoE(drop_tokens=True) needs the same number of tokens on every rank of the expert-parallel "
                f"group, but they hold between {least} and {most} (this rank: {tokens}); use drop_tokens=False "
                f"for uneven batches"
            )

    # The exchange steps without tensor parallelism (tp > 1 takes
    # _run_coordinated instead).

    def to_experts(self, x: torch.Tensor, splits: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
        """Rows for each EP rank, in rank order, to that rank. ``splits`` is
        (send, receive) rows per rank; None for the equal exchange."""
        if self.dispatch_dtype is not None or self.combine_dtype is not None:
            return wire.low_precision(lambda t: self._move(t, splits, True), lambda g: self._move(g, splits, False),
                                      x, self.dispatch_dtype, self.combine_dtype)
        return self._move(x, splits, True)

    def from_experts(self, x: torch.Tensor, splits: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
        """The inverse of ``to_experts`` with the same ``splits``."""
        if self.combine_dtype is not None:
            return wire.low_precision(lambda t: self._move(t, splits, False), lambda g: self._move(g, splits, True),
                                      x, self.combine_dtype, self.combine_dtype)
        return self._move(x, splits, False)

    def _move(self, x: torch.Tensor, splits: tuple[list[int], list[int]] | None, forward: bool) -> torch.Tensor:
        """The exchange to the experts (forward) or back, of any dtype."""
        if self.comm is None or self.ep == 1:
            return x
        if splits is None:
            return self.comm.all_to_all(x, self.algorithm)
        send, recv = splits if forward else (splits[1], splits[0])
        return self.comm.all_to_all_v(x, send, recv, self.algorithm)

    def _check_wire_overlap(self) -> None:
        if self.overlap_degree > 1 and (self.dispatch_dtype is not None or self.combine_dtype is not None):
            raise ValueError(f"MoE: overlap_degree={self.overlap_degree} with dispatch_dtype={self.dispatch_dtype} "
                             f"/ combine_dtype={self.combine_dtype} is not supported; use overlap_degree=1")

    # The flow ---------------------------------------------------------------

    def step(self, routing: Routing, experts: LocalExperts) -> ExpertStep:
        """How this forward's dispatch buffer goes through the owning
        experts. Sequential (N = 1): in ``routing``'s own order. Pipelined:
        in the pipeline's chunk-major order (``Pipeline.chunk_major``), so its
        chunks are slices of the buffer; dropless, the per-expert counts are
        exchanged here, before the dispatch."""
        self._check_wire_overlap()
        if self.overlap_degree > 1:
            pipe = self._pipeline(routing, experts)
            return ExpertStep(pipe.chunk_major(routing), pipe.forward)
        return ExpertStep(routing, lambda rows: self.run(rows, routing, experts))

    def run(self, rows: torch.Tensor, routing: Routing, experts: LocalExperts) -> torch.Tensor:
        """The dispatch buffer ``[R, M]`` through the owning experts, one
        exchange each way; returns the experts' outputs in the same
        ``[R, M]`` layout."""
        if self.groups is not None:
            return self._run_coordinated(rows, routing, experts)
        if routing.capacity is None:
            return self._run_dropless(rows, routing, experts)
        return self._run_padded(rows, routing.capacity, experts)

    def _received_counts(self, routing: Routing) -> list[list[int]]:
        """``[source EP rank][local expert]`` rows that arrive here (dropless):
        one equal all-to-all of the E counts."""
        if self.comm is None or self.ep == 1:
            return counts_matrix(routing.counts.tolist(), self.ep)
        return counts_matrix(self.comm.all_to_all(routing.counts, self.algorithm).tolist(), self.ep)

    def _pipeline(self, routing: Routing, experts: LocalExperts) -> Pipeline:
        if routing.capacity is None:
            sent = counts_matrix(routing.counts.tolist(), self.ep)
            received = self._received_counts(routing)
        else:
            sent = received = [[routing.capacity] * self.num_local for _ in range(self.ep)]
        comm = self.comm if self.groups is not None or self.ep > 1 else None
        return Pipeline(comm, self.groups, self.algorithm, sent, received, routing.capacity is not None,
                        self.overlap_degree, experts)

    def _run_padded(self, rows: torch.Tensor, capacity: int, experts: LocalExperts) -> torch.Tensor:
        ep, local, width = self.ep, self.num_local, rows.shape[1]
        received = self.to_experts(rows)  # [ep source, local, C, M]
        grouped = received.view(ep, local, capacity, width).transpose(0, 1).reshape(local, ep * capacity, width)
        with experts_event():
            out = experts.forward_blocks(grouped)
        back = out.view(local, ep, capacity, width).transpose(0, 1).reshape(ep * local * capacity, width)
        return self.from_experts(back)

    def _run_dropless(self, rows: torch.Tensor, routing: Routing, experts: LocalExperts) -> torch.Tensor:
        ep, local = self.ep, self.num_local
        sent = routing.counts.view(ep, local)
        received = self._received_counts(routing)  # [source rank][local expert], on the host
        splits = (sent.sum(dim=1).tolist(), [sum(r) for r in received])
        arrived = self.to_experts(rows, splits)
        per_expert = [sum(received[src][e] for src in range(ep)) for e in range(local)]
        with experts_event():
            out = experts(transpose_blocks(arrived, received), per_expert)
        by_expert = [[received[src][e] for src in range(ep)] for e in range(local)]
        return self.from_experts(transpose_blocks(out, by_expert), splits)

    def _run_coordinated(self, rows: torch.Tensor, routing: Routing, experts: LocalExperts) -> torch.Tensor:
        groups, ep, local = self.groups, self.ep, self.num_local
        assert groups is not None
        if routing.capacity is None:
            sent = counts_matrix(routing.counts.tolist(), ep)
            received = self._received_counts(routing)
        else:
            sent = received = [[routing.capacity] * local for _ in range(ep)]
        full_in = [sum(row) for row in sent]  # rows of this TP group's buffer for each EP rank
        full_out = [sum(row) for row in received]  # rows each EP source sends this TP group
        pieces = _chunk_pieces(received, Chunking(tuple(full_out), groups.tp), groups.tp_rank)
        arriving = [sum(p) for p in pieces]  # rows of this TP rank's chunks from each EP source

        def there(t: torch.Tensor) -> torch.Tensor:
            return groups.coordinated_all_to_all_v(t, full_in, full_out, self.algorithm)

        def back_again(t: torch.Tensor) -> torch.Tensor:
            return groups.coordinated_all_to_all_back_v(t, arriving, full_in, self.algorithm)

        if self.dispatch_dtype is not None or self.combine_dtype is not None:
            arrived = wire.low_precision(there, back_again, rows, self.dispatch_dtype, self.combine_dtype)
        else:
            arrived = there(rows)
        per_expert = [sum(pieces[s][e] for s in range(ep)) for e in range(local)]
        with experts_event():
            out = experts(transpose_blocks(arrived, pieces), per_expert)
        back = transpose_blocks(out, [[pieces[s][e] for s in range(ep)] for e in range(local)])
        if self.combine_dtype is not None:
            return wire.low_precision(back_again, there, back, self.combine_dtype, self.combine_dtype)
        return back_again(back)

