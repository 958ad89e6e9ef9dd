"""Module-level drop-ins for ``torch.distributed.all_to_all_single``."""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from alltoall._library import _C
from alltoall.ops import autograd, validation
from alltoall.ops.communicator import Communicator, registered
from alltoall.plan import make_plan
from alltoall.transport import GroupRef, resolve_timeout

# Keyed weakly by group, so a destroyed group releases its exchanger.
_flat: weakref.WeakKeyDictionary[dist.ProcessGroup, _C.Exchanger] = weakref.WeakKeyDictionary()


def _flat_exchanger(ref: GroupRef) -> _C.Exchanger:
    # A flat plan needs no subgroup, so building one here communicates nothing.
    exchanger = _flat.get(ref.group)
    if exchanger is None:
        raw = make_plan([0] * len(ref.global_ranks), dist.get_rank(ref.group), "flat")
        groups = [ref.for_cpp() for _ in raw.phases]  # none for a group of one
        exchanger = _C.Exchanger(raw, groups, resolve_timeout(None).total_seconds())
        _flat[ref.group] = exchanger
    return exchanger


def _communicator(ref: GroupRef, algorithm: str) -> Communicator:
    comm = registered(ref.group)
    if comm is None:
        raise ValueError(
            f"algorithm={algorithm!r} needs subgroups, which are never created inside a call: construct "
            f"alltoall.Communicator(group) on every rank of group '{ref.name}' first, or use algorithm='flat'"
        )
    return comm


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None = None, algorithm: str = "flat") -> torch.Tensor:
    """Equal-split all-to-all over ``group``; returns what
    ``dist.all_to_all_single(out, x, group=group)`` writes to ``out``.

    Shapes: ``[p * n, *] -> [p * n, *]``. Autograd-aware. Algorithms other
    than "flat" use the group's Communicator, which must exist.
    """
    validation.check_algorithm(algorithm)
    ref = GroupRef.of(group)
    if algorithm != "flat":
        return _communicator(ref, algorithm).all_to_all(x, algorithm)
    x = validation.check_tensor(x, "all_to_all")
    validation.check_divisible(x, len(ref.global_ranks), "all_to_all")
    return autograd.all_to_all(x, _flat_exchanger(ref))


def all_to_all_v(
    x: torch.Tensor,
    input_splits: validation.Splits,
    output_splits: validation.Splits | None = None,
    group: dist.ProcessGroup | None = None,
    algorithm: str = "flat",
) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
    """Uneven all-to-all over ``group``; see ``Communicator.all_to_all_v``.

    Shapes: ``[sum(input_splits), *] -> [sum(output_splits), *]``. Returns
    ``(output, output_splits)`` when output_splits is None.
    """
    validation.check_algorithm(algorithm)
    ref = GroupRef.of(group)
    if algorithm != "flat":
        return _communicator(ref, algorithm).all_to_all_v(x, input_splits, output_splits, algorithm)
    x = validation.check_tensor(x, "all_to_all_v")
    size = len(ref.global_ranks)
    ins = validation.splits_to_list(input_splits, "input_splits", size, x.shape[0], "all_to_all_v")
    outs = None
    if output_splits is not None:
        outs = validation.splits_to_list(output_splits, "output_splits", size, None, "all_to_all_v")
    out, received = autograd.all_to_all_v(x, _flat_exchanger(ref), ins, outs)
    return out if output_splits is not None else (out, received)
