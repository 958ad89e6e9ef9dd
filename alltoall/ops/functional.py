"""Module-level drop-ins for ``torch.distributed.all_to_all_single``."""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from alltoall.ops import validation
from alltoall.ops.communicator import Communicator, registered
from alltoall.transport import GroupRef

# Keyed weakly by group, so a destroyed group releases its exchanger.
_flat: weakref.WeakKeyDictionary[dist.ProcessGroup, Communicator] = weakref.WeakKeyDictionary()


def _communicator(group: dist.ProcessGroup | None, algorithm: str) -> Communicator:
    """The group's Communicator; for "flat" without one, a flat-only one
    (which needs no subgroup, so building it here communicates nothing)."""
    validation.check_algorithm(algorithm)
    if group is None:
        group = dist.group.WORLD
    comm = registered(group) if group is not None else None
    if comm is not None:
        return comm
    ref = GroupRef.of(group)
    if algorithm != "flat":
        raise ValueError(
            f"algorithm={algorithm!r} needs subgroups, which are never created inside a call: construct "
            f"alltoall.Communicator(group) on every rank of group '{ref.name}' first, or use algorithm='flat'"
        )
    flat = _flat.get(ref.group)
    if flat is None:
        flat = _flat[ref.group] = Communicator.flat_only(ref.group)
    return flat


def all_to_all(
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    algorithm: str = "flat",
    *,
    check: bool | None = None,
) -> torch.Tensor:
    """Equal-split all-to-all over ``group``; returns what
    ``dist.all_to_all_single(out, x, group=group)`` writes to ``out``.

    Shapes: ``[p * n, *] -> [p * n, *]``. Autograd-aware. Algorithms other
    than "flat" use the group's Communicator, which must exist.
    """
    return _communicator(group, algorithm).all_to_all(x, algorithm, check=check)


def all_to_all_v(
    x: torch.Tensor,
    input_splits: validation.Splits,
    output_splits: validation.Splits | None = None,
    group: dist.ProcessGroup | None = None,
    algorithm: str = "flat",
    *,
    check: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
    """Uneven all-to-all over ``group``; see ``Communicator.all_to_all_v``.

    Shapes: ``[sum(input_splits), *] -> [sum(output_splits), *]``. Returns
    ``(output, output_splits)`` when output_splits is None.
    """
    return _communicator(group, algorithm).all_to_all_v(x, input_splits, output_splits, algorithm, check=check)
