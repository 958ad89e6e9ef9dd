"""The pipelined expert exchange: ``MoE(..., overlap_degree=N)``.

The dispatch buffer holds one block per (EP rank d, local expert l). Every
block is cut into N consecutive pieces (piece i of a block of n rows is rows
``[n*i // N, n*(i+1) // N)``); chunk i is piece i of every block. In
capacity mode the blocks all have C rows, so the chunks cut along capacity;
dropless, each block is cut by its own count. A receiver cuts what it
receives by the same rule, so no counts travel beyond the one count
exchange the layer already does.

Schedule (forward; the backward is the same schedule on the gradients,
with each chunk's expert backward in place of its forward)::

    issue dispatch exchanges 0 .. N-1          (queued on the progress thread)
    for i in 0 .. N-1:
        wait dispatch i; experts on chunk i    (dispatch i+1.. and return i-1 run meanwhile)
        issue return exchange i
    wait return exchanges 0 .. N-1; reassemble

All exchanges go through one Communicator's FIFO, so they complete in issue
order on every rank. The backward of a dispatch exchange is the matching
return exchange and vice versa (for the coordinated exchange too: slice and
EP exchange one way, EP exchange and TP all-gather the other), so one
``run`` serves both directions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

from alltoall.moe.experts import LocalExperts
from alltoall.ops import Communicator, ParallelGroups
from alltoall.ops.coordinated import Chunking

Counts = list[list[int]]
# stage(chunk index, rows grouped by local expert, rows per local expert) -> same layout
Stage = Callable[[int, torch.Tensor, list[int]], torch.Tensor]


def piece(n: int, i: int, parts: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of piece i of a block of n rows cut into ``parts``."""
    return n * i // parts, n * (i + 1) // parts


def transposed(counts: Counts) -> tuple[list[int], list[int]]:
    """(starts, sizes) for ``gather_blocks`` that turn blocks stored in
    (a, b) order with sizes ``counts[a][b]`` into (b, a) order."""
    outer, inner = len(counts), len(counts[0]) if counts else 0
    offsets, running = [[0] * inner for _ in range(outer)], 0
    for a in range(outer):
        for b in range(inner):
            offsets[a][b] = running
            running += counts[a][b]
    starts = [offsets[a][b] for b in range(inner) for a in range(outer)]
    sizes = [counts[a][b] for b in range(inner) for a in range(outer)]
    return starts, sizes


def regroup(x: torch.Tensor, counts: Counts) -> torch.Tensor:
    return torch.ops.alltoall.gather_blocks(x, *transposed(counts))


def _chunk_pieces(received: Counts, chunking: Chunking, t: int) -> Counts:
    """Rows of each (source, local expert) inside TP rank t's chunk of each
    source's block: the chunk is a row range, the experts' rows consecutive
    ranges of the block."""
    pieces = []
    for source, counts in enumerate(received):
        lo, hi = chunking.bounds(source, t)
        row, mine = 0, []
        for count in counts:
            mine.append(max(0, min(hi, row + count) - max(lo, row)))
            row += count
        pieces.append(mine)
    return pieces


@dataclass(frozen=True)
class ChunkRoute:
    """One chunk's rows per block, both ways.

    ``sent[d][l]``: rows this rank sends to local expert l of EP rank d;
    ``received[s][l]``: rows EP rank s sends to this rank's local expert l;
    ``arrived[s][l]``: the rows of those that arrive here (``received``,
    or this TP rank's share of it under tensor parallelism).
    """

    sent: Counts
    received: Counts
    arrived: Counts

    @property
    def per_expert(self) -> list[int]:
        return [sum(row[e] for row in self.arrived) for e in range(len(self.arrived[0]))]

    @property
    def by_expert(self) -> Counts:
        return [[row[e] for row in self.arrived] for e in range(len(self.arrived[0]))]


class Pipeline:
    """N chunks of one forward through the experts, and their exchanges.

    Args:
        comm: the EP Communicator (None: a single rank, no exchange).
        groups: a ParallelGroups with tp > 1 for the coordinated exchange, else None.
        algorithm: the exchanges' algorithm.
        sent: ``[ep][L]`` rows of this rank's buffer per block.
        received: ``[ep][L]`` rows each EP source sends here per local expert.
        equal: every block holds the same rows (capacity mode): the equal exchange.
        parts: N.
    """

    def __init__(self, comm: Communicator | None, groups: ParallelGroups | None, algorithm: str,
                 sent: Counts, received: Counts, equal: bool, parts: int, experts: LocalExperts) -> None:
        self.comm, self.groups, self.algorithm = comm, groups, algorithm
        self.equal = equal and groups is None
        self.parts = parts
        self.experts = experts
        self.chunks = [self._chunk(sent, received, i) for i in range(parts)]
        blocks = [n for row in sent for n in row]
        # Buffer blocks in (block, chunk) order <-> chunk-major (chunk, block).
        self._split = transposed([[piece(n, i, parts)[1] - piece(n, i, parts)[0] for i in range(parts)]
                                  for n in blocks])
        self._join = transposed([[piece(n, i, parts)[1] - piece(n, i, parts)[0] for n in blocks]
                                 for i in range(parts)])
        self._chunk_rows = [sum(n for row in c.sent for n in row) for c in self.chunks]

    def _chunk(self, sent: Counts, received: Counts, i: int) -> ChunkRoute:
        def cut(counts: Counts) -> Counts:
            return [[piece(n, i, self.parts)[1] - piece(n, i, self.parts)[0] for n in row] for row in counts]

        s, r = cut(sent), cut(received)
        if self.groups is None:
            return ChunkRoute(s, r, r)
        chunking = Chunking(tuple(sum(row) for row in r), self.groups.tp)
        return ChunkRoute(s, r, _chunk_pieces(r, chunking, self.groups.tp_rank))

    # The exchanges of one chunk (dispatch direction and return direction) ----

    def _to_experts(self, i: int, x: torch.Tensor):
        chunk = self.chunks[i]
        if self.comm is None:
            return _Ready(x)
        if self.groups is not None:
            return self.groups.coordinated_all_to_all_v(x, [sum(r) for r in chunk.sent],
                                                        [sum(r) for r in chunk.received], self.algorithm,
                                                        async_op=True)
        if self.equal:
            return self.comm.all_to_all(x, self.algorithm, async_op=True)
        return self.comm.all_to_all_v(x, [sum(r) for r in chunk.sent], [sum(r) for r in chunk.received],
                                      self.algorithm, async_op=True)

    def _from_experts(self, i: int, y: torch.Tensor):
        chunk = self.chunks[i]
        if self.comm is None:
            return _Ready(y)
        if self.groups is not None:
            return self.groups.coordinated_all_to_all_back_v(y, [sum(r) for r in chunk.arrived],
                                                             [sum(r) for r in chunk.sent], self.algorithm,
                                                             async_op=True)
        if self.equal:
            return self.comm.all_to_all(y, self.algorithm, async_op=True)
        return self.comm.all_to_all_v(y, [sum(r) for r in chunk.received], [sum(r) for r in chunk.sent],
                                      self.algorithm, async_op=True)

    def run(self, buffer: torch.Tensor, stage: Stage, what: str) -> torch.Tensor:
        """``buffer`` ``[R, M]`` (no grad) through the N-chunk schedule."""
        pieces = torch.ops.alltoall.gather_blocks(buffer, *self._split).split(self._chunk_rows)
        outgoing = [self._to_experts(i, pieces[i]) for i in range(self.parts)]
        returning = []
        for i, chunk in enumerate(self.chunks):
            arrived = outgoing[i].wait()
            outgoing[i] = None  # free the received rows once used
            with record_function(f"alltoall.moe.experts {what} chunk {i}"):
                out = stage(i, regroup(arrived, chunk.arrived), chunk.per_expert)
                back = regroup(out, chunk.by_expert)
            returning.append(self._from_experts(i, back))
        outs = [work.wait() for work in returning]
        return torch.ops.alltoall.gather_blocks(torch.cat(outs), *self._join)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for ``rows`` ``[R, M]``, differentiable in
        ``rows`` and the experts' parameters."""
        params = [p for p in self.experts.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (rows.requires_grad or params):
            return PipelinedExperts.apply(rows, self, *params)
        return self.run(rows, lambda i, x, per_expert: self.experts(x, per_expert), "forward")


class _Ready:
    """A finished 'exchange' for a single rank."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class PipelinedExperts(torch.autograd.Function):
    """The whole exchange -> experts -> exchange region as one autograd node,
    so the backward can pipeline too (the autograd engine would run chunks
    one after another). Each chunk's experts run on parameter aliases, so
    hooks on the parameters (the TP gradient sum) fire once, on the summed
    gradient, after every exchange of the backward has completed."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, pipe: Pipeline, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        names = {id(p): n for n, p in pipe.experts.named_parameters()}
        aliases = [p.detach().requires_grad_() for p in params]
        overrides = {names[id(p)]: a for p, a in zip(params, aliases, strict=True)}
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []

        def stage(i: int, x: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
            x = x.detach().requires_grad_()
            with torch.enable_grad():
                y = torch.func.functional_call(pipe.experts, overrides, (x, per_expert))
            saved.append((x, y))
            return y.detach()

        out = pipe.run(rows.detach(), stage, "forward")
        ctx.pipe, ctx.saved, ctx.aliases = pipe, saved, aliases
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pipe, saved, aliases = ctx.pipe, ctx.saved, ctx.aliases
        totals: list[torch.Tensor | None] = [None] * len(aliases)

        def stage(i: int, g: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
            x, y = saved[i]
            grads = torch.autograd.grad(y, [x, *aliases], g, allow_unused=True)
            saved[i] = None  # type: ignore[call-overload]
            for j, gp in enumerate(grads[1:]):
                if gp is not None:
                    totals[j] = gp if totals[j] is None else totals[j] + gp
            return grads[0] if grads[0] is not None else torch.zeros_like(x)

        grad_rows = pipe.run(grad.contiguous(), stage, "backward")
        ctx.saved = ctx.aliases = None
        return (grad_rows, None, *totals)


def check_overlap_degree(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"overlap_degree={value!r} must be an integer >= 1")
    return value


def counts_matrix(flat: Sequence[int], ep: int) -> Counts:
    local = len(flat) // ep
    return [list(flat[d * local:(d + 1) * local]) for d in range(ep)]
