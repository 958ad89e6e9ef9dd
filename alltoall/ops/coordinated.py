"""The tensor-parallel-coordinated all-to-all (DeepSpeed-MoE section 5.3).

With tensor slicing of degree L, activations are replicated across each TP
group. The exchange therefore runs only among the ranks that share a TP
rank (the expert-parallel group), each TP rank carrying 1/L of the rows, and
an all-gather inside the TP group rebuilds the replicated result.

Layout. The input ``x`` is a dispatch buffer replicated across the TP group,
made of one block per expert-parallel destination (``input_splits[d]`` rows
for destination d). Block d is cut into L chunks: TP rank t owns rows
``[n*t // L, n*(t+1) // L)`` of a block of n rows.

- ``dispatch``: TP rank t takes its chunk of every block (DeepSpeed's "drop
  tokens"), then all-to-all over the EP group. Rank (e, t) returns, from
  every EP source s, chunk t of the block s sent to e: exactly chunk t of
  each block of what a naive ``all_to_all_single(x, ep_group)`` returns.
- ``combine``: all-to-all back over the EP group, then all-gather over the
  TP group and reassembly (DeepSpeed's "gather tokens"). It returns, on every
  TP rank, what a naive all-to-all of the de-duplicated full input (the
  chunks of all TP ranks put back together) returns.

The two are adjoint: the backward of dispatch is an all-to-all back and an
all-gather (slice -> gather), the backward of combine an all-to-all and a
slice (gather -> slice), as in DeepSpeed's drop/gather mappings, so
gradients are right when the replicated activations feed TP layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alltoall._library import _C


@dataclass(frozen=True)
class Chunking:
    """How blocks of rows are cut among ``tp`` tensor-parallel ranks."""

    block_rows: tuple[int, ...]
    tp: int

    def bounds(self, block: int, t: int) -> tuple[int, int]:
        n = self.block_rows[block]
        return n * t // self.tp, n * (t + 1) // self.tp

    def sizes(self, t: int) -> list[int]:
        """Rows of TP rank t's chunk of every block."""
        return [hi - lo for lo, hi in (self.bounds(d, t) for d in range(len(self.block_rows)))]

    def chunk_starts(self, t: int) -> list[int]:
        """Where TP rank t's chunk of every block starts in the full buffer."""
        starts, offset = [], 0
        for d, n in enumerate(self.block_rows):
            starts.append(offset + self.bounds(d, t)[0])
            offset += n
        return starts


@dataclass(frozen=True)
class TensorGroup:
    """This rank's TP group as the chunk moves need it: the all-gather, this
    rank's TP coordinate t, and the TP coordinate of each member in group
    order (ascending global rank, which need not follow t when TP groups
    span interleaved nodes)."""

    gather: _C.GroupGather
    t: int
    t_of_member: tuple[int, ...]


def take_chunks(x: torch.Tensor, chunking: Chunking, t: int) -> torch.Tensor:
    """[sum(block_rows), *] -> [sum(chunk sizes of t), *]."""
    return torch.ops.alltoall.gather_blocks(x, chunking.chunk_starts(t), chunking.sizes(t))


def gather_layout(chunking: Chunking, group: TensorGroup) -> tuple[int, list[int], list[int]]:
    """How ``gather_chunks`` reassembles: the padded rows each TP rank
    contributes to the all-gather, and the (start, count) of every piece of
    the gathered buffer in the order of the full buffer."""
    L = chunking.tp
    width = max(sum(chunking.sizes(t)) for t in range(L))
    starts, counts = [], []
    offsets = [[0] * L for _ in chunking.block_rows]
    for member, t in enumerate(group.t_of_member):
        running = 0
        for d, rows in enumerate(chunking.sizes(t)):
            offsets[d][t] = member * width + running
            running += rows
    for d in range(len(chunking.block_rows)):
        for t in range(L):
            lo, hi = chunking.bounds(d, t)
            starts.append(offsets[d][t])
            counts.append(hi - lo)
    return width, starts, counts


def gather_chunks(y: torch.Tensor, chunking: Chunking, group: TensorGroup) -> torch.Tensor:
    """Every TP rank's chunks -> the full buffer, identical on every TP rank.

    Chunks differ in size across TP ranks when blocks do not divide by L, so
    each rank pads to the largest, one all-gather moves them all, and one
    gather_blocks pass puts every block back together in order.
    """
    width, starts, counts = gather_layout(chunking, group)
    if y.shape[0] < width:
        y = torch.cat([y, y.new_zeros((width - y.shape[0], *y.shape[1:]))])
    gathered = group.gather.all_gather(y)
    return torch.ops.alltoall.gather_blocks(gathered, starts, counts)


class TakeChunks(torch.autograd.Function):
    """Forward: keep this TP rank's chunks. Backward: all-gather the chunks'
    gradients, so the replicated input gets its full gradient on every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, chunking: Chunking, group: TensorGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.chunking, ctx.group = chunking, group
        return take_chunks(x, chunking, group.t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return gather_chunks(grad.contiguous(), ctx.chunking, ctx.group), None, None


class GatherChunks(torch.autograd.Function):
    """Forward: rebuild the replicated buffer from every TP rank's chunks.
    Backward: keep this TP rank's chunks of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, chunking: Chunking, group: TensorGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.chunking, ctx.t = chunking, group.t
        return gather_chunks(y, chunking, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return take_chunks(grad.contiguous(), ctx.chunking, ctx.t), None, None
