"""Pure index data of the expert dispatcher (no communication): which
assignments a capacity keeps, and the deduplicated (row, destination)
pairs a hop sends.

An *item* is one assignment (a token's choice of an expert) travelling with
the row of its token. Items are grouped by row: ``row_ptr[r] ..
row_ptr[r + 1]`` are row r's items, and each item has a destination key (a
peer position in a hop's group, or -1 when it does not travel in this hop).
A hop sends each row once to each key among its items (a *pair*), in
``(key, row)`` order, and the items in ``(key, row, item)`` order, so each
key's block of items follows its block of rows. One kernel pass computes it
all (``torch.ops.alltoall.dedup_pairs``, csrc/kernels/dedup_element.h);
``pairs_reference`` is the same in plain PyTorch, for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alltoall._library import _C  # noqa: F401  (registers torch.ops.alltoall)


@dataclass(frozen=True)
class Pairs:
    """One hop's send layout.

    Attributes:
        item_order: ``[I']`` the items that travel (key >= 0), in send order.
        item_pair: ``[I']`` the send-buffer pair of each of them (same order).
        pair_row: ``[P]`` the row each pair sends, in send order.
        pair_counts: pairs (rows) per key, a list of ints.
        item_counts: items per key, a list of ints.
    """

    item_order: torch.Tensor
    item_pair: torch.Tensor
    pair_row: torch.Tensor
    pair_counts: list[int]
    item_counts: list[int]


def keep_by_capacity(expert_index: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """``expert_index`` ``[S, k]`` with the assignments a capacity drops set
    to -1: slots go in priority order (every first choice in token order,
    then every second choice, ...), and a slot ``>= capacity`` is dropped,
    as ``alltoall.moe.dispatch.route`` does. Entries already -1 take no slot."""
    if capacity is None or expert_index.numel() == 0:
        return expert_index
    by_priority = expert_index.t().reshape(-1)  # (choice, token) order
    valid = (by_priority >= 0).nonzero().squeeze(1)
    experts = by_priority[valid]
    sorted_experts, order = torch.sort(experts, stable=True)
    starts = torch.cumsum(torch.bincount(sorted_experts, minlength=num_experts), 0)
    starts = starts - torch.bincount(sorted_experts, minlength=num_experts)
    slot_sorted = torch.arange(experts.numel(), device=experts.device) - starts[sorted_experts]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    kept = by_priority.clone()
    kept[valid[slot >= capacity]] = -1
    return kept.view(expert_index.shape[1], expert_index.shape[0]).t().contiguous()


def pairs(row_ptr: torch.Tensor, item_key: torch.Tensor, num_keys: int) -> Pairs:
    """The hop's pairs, by the kernel (``torch.ops.alltoall.dedup_pairs``)."""
    item_pos, item_pair, pair_row, pair_counts, item_counts = torch.ops.alltoall.dedup_pairs(
        row_ptr, item_key, num_keys)
    pair_list = pair_counts.tolist()
    item_list = item_counts.tolist()
    n_items, n_pairs = sum(item_list), sum(pair_list)
    travelling = item_pos >= 0
    order = torch.empty(n_items, dtype=torch.int64, device=item_key.device)
    order[item_pos[travelling]] = travelling.nonzero().squeeze(1)
    return Pairs(order, item_pair[order], pair_row[:n_pairs], pair_list, item_list)


def pairs_reference(row_ptr: torch.Tensor, item_key: torch.Tensor, num_keys: int) -> Pairs:
    """``pairs`` in plain PyTorch (a sort and a unique)."""
    num_rows = row_ptr.numel() - 1
    device = item_key.device
    item_row = torch.repeat_interleave(torch.arange(num_rows, device=device), row_ptr.diff())
    selected = (item_key >= 0).nonzero().squeeze(1)
    composite = item_key[selected] * max(num_rows, 1) + item_row[selected]
    composite_sorted, order = torch.sort(composite, stable=True)
    unique, inverse = torch.unique_consecutive(composite_sorted, return_inverse=True)
    pair_key = unique // max(num_rows, 1)
    pair_counts = torch.bincount(pair_key, minlength=num_keys).tolist()
    item_counts = torch.bincount(item_key[selected], minlength=num_keys).tolist()
    return Pairs(selected[order], inverse, unique % max(num_rows, 1), pair_counts, item_counts)
