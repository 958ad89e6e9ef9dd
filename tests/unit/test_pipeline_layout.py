"""The pipeline's chunk-major buffer order (alltoall.moe.pipeline): a
dispatch through ``Pipeline.chunk_major(routing)`` writes exactly the rows
of the block-order buffer, regrouped chunk by chunk, and a combine through
it reads them back; so the pipeline needs no reordering copy around its
exchanges."""

from __future__ import annotations

import itertools

import pytest
import torch

from alltoall.moe.dispatch import combine, dispatch, route
from alltoall.moe.pipeline import Pipeline, counts_matrix, piece

# (experts, capacity or None for dropless, N): N larger than some blocks, so chunks with zero rows occur.
CASES = list(itertools.product([4, 6], [None, 1, 3], [1, 2, 3, 5]))


def _chunk_major_reference(rows: torch.Tensor, blocks: list[int], parts: int) -> torch.Tensor:
    """The block-order buffer's rows, piece i of every block for chunk i, by slicing."""
    starts = [sum(blocks[:b]) for b in range(len(blocks))]
    out = []
    for i in range(parts):
        for start, n in zip(starts, blocks, strict=True):
            lo, hi = piece(n, i, parts)
            out.append(rows[start + lo:start + hi])
    return torch.cat(out)


@pytest.mark.parametrize("experts,capacity,parts", CASES)
def test_chunk_major_routing_dispatches_and_combines_the_same_rows(experts, capacity, parts):
    torch.manual_seed(experts * 100 + parts)
    tokens, k, width = 11, 2, 5
    routing = route(torch.randn(tokens, experts), k, capacity)
    blocks = [capacity] * experts if capacity is not None else routing.counts.tolist()
    sent = counts_matrix(blocks, 1)
    pipe = Pipeline(None, None, "flat", sent, sent, capacity is not None, parts, experts=None)  # type: ignore[arg-type]
    chunked = pipe.chunk_major(routing)

    x = torch.randn(tokens, width, dtype=torch.float64)
    plain = dispatch(x, routing)
    assert torch.equal(dispatch(x, chunked), _chunk_major_reference(plain, blocks, parts))

    rows = torch.randn(routing.num_rows, width, dtype=torch.float64)
    weights = torch.rand(tokens, k, dtype=torch.float64)
    torch.testing.assert_close(combine(_chunk_major_reference(rows, blocks, parts), chunked, weights),
                               combine(rows, routing, weights))
    # Dropped assignments stay dropped; kept ones land on distinct rows.
    assert torch.equal(chunked.dest_row < 0, routing.dest_row < 0)
    kept = chunked.dest_row[chunked.dest_row >= 0]
    assert kept.unique().numel() == kept.numel()
