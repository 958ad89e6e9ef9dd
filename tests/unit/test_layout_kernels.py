"""The block layout kernels against a slow pure-PyTorch reference."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

import alltoall  # noqa: F401  (registers torch.ops.alltoall)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8, torch.float64]


def reference_gather(x, starts, counts):
    parts = [x[s:s + c] for s, c in zip(starts, counts, strict=True)]
    return torch.cat(parts) if parts else x[:0]


def reference_scatter(x, starts, counts, out_rows):
    out = torch.zeros((out_rows, *x.shape[1:]), dtype=x.dtype)
    row = 0
    for s, c in zip(starts, counts, strict=True):
        out[s:s + c] = x[row:row + c]
        row += c
    return out


def random_input(rows, trailing, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (rows, *trailing), generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn((rows, *trailing), generator=g).to(dtype)
    return torch.randint(0, 250, (rows, *trailing), generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trailing", [(), (1,), (3,), (4, 5), (0,), (33,)])
def test_gather_blocks_matches_reference(dtype, trailing):
    rng = random.Random(zlib.crc32(f"{dtype}{trailing}".encode()))
    for trial in range(5):
        rows = rng.randint(0, 40)
        x = random_input(rows, trailing, dtype, trial)
        n = rng.randint(0, 8)
        starts, counts = [], []
        for _ in range(n):
            s = rng.randint(0, rows)
            starts.append(s)
            counts.append(rng.randint(0, rows - s))
        out = torch.ops.alltoall.gather_blocks(x, starts, counts)
        assert torch.equal(out, reference_gather(x, starts, counts))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_blocks_inverts_gather(dtype):
    rng = random.Random(3)
    for trial in range(5):
        sizes = [rng.randint(0, 5) for _ in range(rng.randint(1, 9))]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        perm = list(range(len(sizes)))
        rng.shuffle(perm)
        x = random_input(sum(sizes), (3,), dtype, trial)
        starts = [offsets[i] for i in perm]
        counts = [sizes[i] for i in perm]
        packed = torch.ops.alltoall.gather_blocks(x, starts, counts)
        assert torch.equal(packed, reference_gather(x, starts, counts))
        back = torch.ops.alltoall.scatter_blocks(packed, starts, counts, x.shape[0])
        assert torch.equal(back, reference_scatter(packed, starts, counts, x.shape[0]))
        assert torch.equal(back, x)


def test_unaligned_and_non_contiguous_inputs():
    base = torch.arange(7 * 9, dtype=torch.uint8).view(7, 9)
    x = base[:, 1:8]  # rows of 7 bytes, not contiguous
    out = torch.ops.alltoall.gather_blocks(x, [5, 0], [2, 3])
    assert torch.equal(out, reference_gather(x, [5, 0], [2, 3]))


def test_large_blocks_are_split_across_threads():
    x = torch.randn(4096, 257)
    starts = list(range(4095, -1, -1))
    out = torch.ops.alltoall.gather_blocks(x, starts, [1] * 4096)
    assert torch.equal(out, x.flip(0))


def test_out_of_range_block_names_it():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"block 1 covers rows \[3, 5\) outside the 4 rows"):
        torch.ops.alltoall.gather_blocks(x, [0, 3], [1, 2])
    with pytest.raises(ValueError, match="starts has 2 entries but counts has 1"):
        torch.ops.alltoall.gather_blocks(x, [0, 3], [1])
    with pytest.raises(ValueError, match="0-d"):
        torch.ops.alltoall.gather_blocks(torch.tensor(1.0), [], [])


def test_meta_shapes():
    x = torch.empty(10, 3, device="meta")
    assert torch.ops.alltoall.gather_blocks(x, [0, 5], [2, 4]).shape == (6, 3)
    assert torch.ops.alltoall.scatter_blocks(x[:6], [0, 5], [2, 4], 12).shape == (12, 3)


def test_opcheck():
    x = torch.randn(10, 3)
    torch.library.opcheck(torch.ops.alltoall.gather_blocks.default, (x, [4, 0], [3, 2]),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.alltoall.scatter_blocks.default, (x[:5], [4, 0], [3, 2], 8),
                          test_utils=("test_schema", "test_faketensor"))
