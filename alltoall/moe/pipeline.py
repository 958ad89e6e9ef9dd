"""The pipelined expert exchange: ``MoE(..., overlap_degree=N)``.

The dispatch buffer holds one block per (EP rank d, local expert l). Every
block is cut into N consecutive pieces (piece i of a block of n rows is rows
``[n*i // N, n*(i+1) // N)``); chunk i is piece i of every block. In
capacity mode the blocks all have C rows, so the chunks cut along capacity;
dropless, each block is cut by its own count. A receiver cuts what it
receives by the same rule, so no counts travel beyond the one count
exchange the layer already does.

The buffers the pipeline takes and returns are chunk-major: chunk 0's rows
(piece 0 of every block, in block order), then chunk 1's, and so on.
``Pipeline.chunk_major`` gives the routing whose dispatch writes that order
(and whose combine reads it), so every chunk is a contiguous slice and no
copy reorders the whole buffer before the first exchange or after the last:
at N = 2 those two copies cost about as much as the overlap saves.

Schedule (forward; the backward is the same schedule on the gradients,
with each chunk's expert backward in place of its forward)::

    issue dispatch exchanges 0 .. N-1          (queued on the progress thread)
    i = 0
    while i < N:
        wait dispatch i; j = i + 1 + the later chunks already arrived
        experts on chunks i .. j-1 at once     (dispatch j.. and earlier returns run meanwhile)
        issue return exchanges i .. j-1; i = j
    wait return exchanges 0 .. N-1; concatenate them (chunk-major)

Chunks that arrived while the experts were busy have nothing left to overlap
and would only add an expert call each, so they run together; exchanges
that finish at once cost one expert call, as at N = 1.

All exchanges go through one Communicator's FIFO, so they complete in issue
order on every rank. The backward of a dispatch exchange is the matching
return exchange and vice versa (for the coordinated exchange too: slice and
EP exchange one way, EP exchange and TP all-gather the other), so one
``run`` serves both directions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

from alltoall.moe.dispatch import Routing
from alltoall.moe.experts import LocalExperts
from alltoall.ops import Communicator, ParallelGroups
from alltoall.ops.coordinated import Chunking

Counts = list[list[int]]
# stage(chunk index, rows grouped by local expert, rows per local expert) -> same layout
Stage = Callable[[int, torch.Tensor, list[int]], torch.Tensor | None]


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


def _span_orders(chunks: Sequence[ChunkRoute]) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]],
                                                       list[int]]:
    """For consecutive chunks run as one expert call: (starts, sizes) for
    ``gather_blocks`` that turn their received rows, concatenated in
    (chunk, source, expert) block order, into (expert, chunk, source) order;
    the inverse; and the rows per local expert. One chunk: the plain
    (source, expert) -> (expert, source) transposition."""
    sources, experts = len(chunks[0].arrived), len(chunks[0].arrived[0])
    stored = [(c, s, e) for c in range(len(chunks)) for s in range(sources) for e in range(experts)]
    grouped = [(c, s, e) for e in range(experts) for c in range(len(chunks)) for s in range(sources)]

    def size(key: tuple[int, int, int]) -> int:
        return chunks[key[0]].arrived[key[1]][key[2]]

    def offsets(order: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], int]:
        where, running = {}, 0
        for key in order:
            where[key], running = running, running + size(key)
        return where

    at_stored, at_grouped = offsets(stored), offsets(grouped)
    to_experts = ([at_stored[k] for k in grouped], [size(k) for k in grouped])
    from_experts = ([at_grouped[k] for k in stored], [size(k) for k in stored])
    return to_experts, from_experts, [sum(chunk.per_expert[e] for chunk in chunks) for e in range(experts)]


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
        # Buffer rows in (block, chunk) order -> chunk-major (chunk, block).
        self._split = transposed([[piece(n, i, parts)[1] - piece(n, i, parts)[0] for i in range(parts)]
                                  for n in blocks])
        self._chunk_rows = [sum(n for row in c.sent for n in row) for c in self.chunks]

    def chunk_major(self, routing: Routing) -> Routing:
        """``routing`` with its buffer rows renumbered chunk-major: dispatch
        through the result writes the buffer this pipeline takes, and
        combine reads the one it returns. ``source`` ``[R]`` is permuted,
        ``dest_row`` ``[S, k]`` relabelled (-1, dropped, stays -1)."""
        device = routing.source.device
        starts = torch.tensor(self._split[0], dtype=torch.int64, device=device)
        sizes = torch.tensor(self._split[1], dtype=torch.int64, device=device)
        rows = routing.num_rows
        # old_row[r']: the block-order row that chunk-major row r' holds.
        old_row = torch.arange(rows, device=device) + torch.repeat_interleave(
            starts - (torch.cumsum(sizes, 0) - sizes), sizes, output_size=rows)
        new_row = torch.empty_like(old_row)
        new_row[old_row] = torch.arange(rows, device=device)
        dest = routing.dest_row
        dest_row = torch.where(dest >= 0, new_row[dest.clamp(min=0)], dest)
        return Routing(routing.expert_index, dest_row, routing.source[old_row], routing.counts, routing.capacity)

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

    def run(self, buffer: torch.Tensor, stage: Stage, what: str, back: bool = True,
            spans: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
        """``buffer`` ``[R, M]`` (no grad, chunk-major) through the N-chunk
        schedule; the result is chunk-major too.

        Chunks ``[i, j)`` of a span go through the experts as one call.
        ``spans=None`` decides as it goes: with chunk i, every later chunk
        whose rows have already arrived (nothing left to overlap them with);
        so exchanges that finish at once (one rank, a local copy) cost one
        expert call, as at N = 1. The backward passes the forward's spans.
        ``back=False``: the stage returns nothing to send back (the backward
        when the rows need no gradient), so only the first exchanges run.
        Returns the result (None when ``back=False``) and the spans run.
        """
        pieces = buffer.split(self._chunk_rows)
        outgoing = [self._to_experts(i, pieces[i]) for i in range(self.parts)]
        del pieces
        returning, used, i = [], [], 0
        while i < self.parts:
            outgoing[i].wait()
            if spans is None:
                j = i + 1
                while j < self.parts and outgoing[j].is_completed():
                    j += 1
            else:
                j = spans[len(used)][1]
            arrived = [outgoing[c].wait() for c in range(i, j)]
            outgoing[i:j] = [None] * (j - i)  # free the received rows once used
            to_experts, from_experts, per_expert = _span_orders(self.chunks[i:j])
            with record_function(f"alltoall.moe.experts {what} chunk {i}" + (f"..{j - 1}" if j - i > 1 else "")):
                rows = arrived[0] if j - i == 1 else torch.cat(arrived)
                del arrived
                out = stage(len(used), torch.ops.alltoall.gather_blocks(rows, *to_experts), per_expert)
                del rows
                if back:
                    assert out is not None
                    out = torch.ops.alltoall.gather_blocks(out, *from_experts)
            if back:
                sizes = [sum(map(sum, chunk.arrived)) for chunk in self.chunks[i:j]]
                for c, part in zip(range(i, j), out.split(sizes), strict=True):
                    returning.append(self._from_experts(c, part))
            used.append((i, j))
            i = j
        if not back:
            return None, used
        return torch.cat([work.wait() for work in returning]), used

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for ``rows`` ``[R, M]`` (chunk-major, both),
        differentiable in ``rows`` and the experts' parameters."""
        params = [p for p in self.experts.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (rows.requires_grad or params):
            return PipelinedExperts.apply(rows, self, *params)
        return self.run(rows, lambda i, x, per_expert: self.experts(x, per_expert, batched=self.equal), "forward")[0]


class _Ready:
    """A finished 'exchange' for a single rank."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value

    def is_completed(self) -> bool:
        return True


class _Schedule(nn.Module):
    """Runs ``body`` with ``experts`` as a submodule, so that one
    ``functional_call`` puts parameter aliases in place for all of it."""

    def __init__(self, experts: LocalExperts, body: Callable[[], Any]) -> None:
        super().__init__()
        self.experts = experts
        self.body = body

    def forward(self) -> Any:
        return self.body()


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
        # As at N = 1: the experts' input gradient (and the backward's
        # return exchanges) only when the rows need it.
        rows_grad = rows.requires_grad
        saved: list[tuple[torch.Tensor, torch.Tensor] | None] = []

        def stage(i: int, x: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
            x = x.detach().requires_grad_(rows_grad)
            with torch.enable_grad():
                y = pipe.experts(x, per_expert, batched=pipe.equal)
            saved.append((x, y))
            return y.detach()

        # The aliases go in once for the whole schedule, not once per chunk
        # (a reparametrization costs about as much as a small expert call).
        body = _Schedule(pipe.experts, lambda: pipe.run(rows.detach(), stage, "forward"))
        out, spans = torch.func.functional_call(body, {f"experts.{n}": a for n, a in overrides.items()}, ())
        ctx.pipe, ctx.saved, ctx.aliases, ctx.rows_grad, ctx.spans = pipe, saved, aliases, rows_grad, spans
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pipe, saved, aliases, rows_grad = ctx.pipe, ctx.saved, ctx.aliases, ctx.rows_grad

        def stage(i: int, g: torch.Tensor, per_expert: list[int]) -> torch.Tensor | None:
            x, y = saved[i]  # type: ignore[misc]
            saved[i] = None  # the chunk's graph goes as soon as it is used
            # Parameter gradients accumulate in place on the aliases' .grad
            # (chunk 0's is taken as is, later chunks are added to it in
            # chunk order), rather than N full-size temporaries and sums.
            torch.autograd.backward(y, g, inputs=[*aliases, x] if rows_grad else aliases)
            if not rows_grad:
                return None
            return x.grad if x.grad is not None else torch.zeros_like(x)

        grad_rows, _ = pipe.run(grad.contiguous(), stage, "backward", back=rows_grad, spans=ctx.spans)
        totals = [a.grad for a in aliases]
        ctx.saved = ctx.aliases = None
        return (grad_rows, None, *totals)


def check_overlap_degree(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"overlap_degree={value!r} must be an integer >= 1")
    return value


def counts_matrix(flat: Sequence[int], ep: int) -> Counts:
    local = len(flat) // ep
    return [list(flat[d * local:(d + 1) * local]) for d in range(ep)]
