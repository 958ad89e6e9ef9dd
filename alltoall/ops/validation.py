"""Argument checks that run before any communication. Each raises a
ValueError naming the offending value."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alltoall.topology import Topology

ALGORITHM_CHOICES = ("auto", "flat", "hierarchical")

Splits = Sequence[int] | torch.Tensor


def check_tensor(x: object, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{op}: the input is a 0-d tensor; it needs a dim 0 to split among ranks")
    return x


def check_divisible(x: torch.Tensor, group_size: int, op: str) -> None:
    if x.shape[0] % group_size:
        raise ValueError(
            f"{op}: dim 0 of the input (shape {tuple(x.shape)}) is {x.shape[0]}, "
            f"not divisible by the group size {group_size}"
        )


def check_algorithm(algorithm: str, topology: Topology | None = None) -> None:
    if algorithm not in ALGORITHM_CHOICES:
        raise ValueError(f"algorithm={algorithm!r} is not one of {', '.join(ALGORITHM_CHOICES)}")
    if algorithm == "hierarchical" and topology is not None and not topology.uniform:
        raise ValueError(
            f"algorithm='hierarchical' needs nodes of equal size, but this group's nodes hold "
            f"{list(topology.node_sizes)} ranks; use 'flat'"
        )


def splits_to_list(splits: Splits, name: str, group_size: int, rows: int | None, op: str) -> list[int]:
    """Row counts per peer as a list of ints; tensors may be on any device."""
    if isinstance(splits, torch.Tensor):
        if splits.dim() != 1 or splits.dtype.is_floating_point or splits.dtype == torch.bool:
            raise ValueError(f"{op}: {name} must be a 1-d integer tensor, got {splits.dtype} of shape "
                             f"{tuple(splits.shape)}")
        values = [int(v) for v in splits.tolist()]
    else:
        try:
            values = [int(v) for v in splits]
        except TypeError:
            raise ValueError(f"{op}: {name} must be a sequence of ints or a tensor, got "
                             f"{type(splits).__name__}") from None
    if len(values) != group_size:
        raise ValueError(f"{op}: {name} has {len(values)} entries but the group has {group_size} ranks")
    negative = [(i, v) for i, v in enumerate(values) if v < 0]
    if negative:
        i, v = negative[0]
        raise ValueError(f"{op}: {name}[{i}] = {v} is negative")
    if rows is not None and sum(values) != rows:
        raise ValueError(f"{op}: {name} sum to {sum(values)} but dim 0 of the input is {rows}")
    return values
