"""The dedup dispatch's index kernel (torch.ops.alltoall.dedup_pairs)
against its plain PyTorch reference, the capacity rule against a plain loop,
and the op's registration (opcheck)."""

from __future__ import annotations

import pytest
import torch

import alltoall  # noqa: F401  (registers the ops)
from alltoall.ops.dispatch_index import keep_by_capacity, pairs, pairs_reference
from tests.harness.dispatcher_checks import reference_keep


def _random_items(seed: int, rows: int, most: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, most + 1, (rows,), generator=g)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    key = torch.randint(-1, keys, (int(lengths.sum()),), generator=g)
    return row_ptr, key


@pytest.mark.parametrize("rows,most,keys", [(0, 3, 2), (1, 1, 1), (7, 3, 4), (600, 8, 3), (1000, 8, 64)])
def test_pairs_kernel_matches_reference(rows, most, keys):
    for seed in range(3):
        row_ptr, key = _random_items(seed, rows, most, keys)
        got, want = pairs(row_ptr, key, keys), pairs_reference(row_ptr, key, keys)
        assert got.pair_counts == want.pair_counts and got.item_counts == want.item_counts
        for name in ("item_order", "item_pair", "pair_row"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_pairs_kernel_raises_on_bad_input():
    with pytest.raises(ValueError, match=r"item_key holds values in \[-1, 5\], outside \[-1, 3\)"):
        torch.ops.alltoall.dedup_pairs(torch.tensor([0, 2]), torch.tensor([-1, 5]), 3)
    with pytest.raises(ValueError, match="row_ptr must run from 0 to the 2 items"):
        torch.ops.alltoall.dedup_pairs(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="num_keys=0"):
        torch.ops.alltoall.dedup_pairs(torch.tensor([0]), torch.tensor([], dtype=torch.int64), 0)


def test_pairs_op_registration():
    row_ptr, key = _random_items(0, 9, 4, 3)
    torch.library.opcheck(torch.ops.alltoall.dedup_pairs.default, (row_ptr, key, 3))


@pytest.mark.parametrize("capacity", [None, 0, 1, 3])
def test_capacity_rule_matches_plain_loop(capacity):
    g = torch.Generator().manual_seed(capacity or 0)
    index = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(20)])
    index[torch.rand(index.shape, generator=g) < 0.2] = -1
    assert torch.equal(keep_by_capacity(index, 8, capacity), reference_keep(index, capacity))


@pytest.mark.gpu
def test_pairs_kernel_on_cuda_matches_cpu():
    for rows, most, keys in [(0, 3, 2), (37, 6, 4), (5000, 8, 64)]:
        row_ptr, key = _random_items(rows, rows, most, keys)
        got = torch.ops.alltoall.dedup_pairs(row_ptr.cuda(), key.cuda(), keys)
        want = torch.ops.alltoall.dedup_pairs(row_ptr, key, keys)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.cpu(), b)
