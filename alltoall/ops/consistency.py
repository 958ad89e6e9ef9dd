"""Collective argument checks, run before any data moves when ``check=True``
or ``ALLTOALL_CHECK=1``.

Ranks that disagree are what makes an all-to-all hang or scribble over
memory (DeepSpeed issues 5794, 6809, 7141). With the check on, every rank
validates its own arguments, then the ranks share one small record each
(an error, the dtype, the trailing shape, dim 0, the algorithm) and, for
uneven splits, run one all-to-all of split counts. Every rank therefore holds
O(p) numbers and raises the same ValueError, naming the ranks and counts,
even when only one rank's arguments are wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

CHECK_ENV = "ALLTOALL_CHECK"
MAX_REPORTED = 8


def enabled(check: bool | None) -> bool:
    """The explicit flag, else ``ALLTOALL_CHECK`` (1, true, yes or on)."""
    if check is not None:
        return check
    return os.environ.get(CHECK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Validated:
    """What a rank's local validation produced."""

    algorithm: str
    input_splits: list[int] | None = None
    output_splits: list[int] | None = None


@dataclass(frozen=True)
class _Record:
    error: str | None
    dtype: str = ""
    trailing: tuple[int, ...] = ()
    rows: int = 0
    algorithm: str = ""


def _name(group: dist.ProcessGroup, rank: int) -> str:
    if group is dist.group.WORLD:
        return f"rank {rank}"
    return f"group rank {rank} (global {dist.get_global_rank(group, rank)})"


def agree(
    op: str,
    group: dist.ProcessGroup,
    x: torch.Tensor,
    validate: Callable[[], Validated],
    rank_order: list[int] | None = None,
) -> Validated:
    """Runs ``validate`` on every rank and raises the same ValueError on all
    of them if any rank failed or the ranks disagree; collective over ``group``.

    Equal splits (no splits in the result) need the same dim 0 everywhere.
    Uneven splits need input_splits[d] on rank s to equal output_splits[s]
    on rank d, whenever output_splits are given. With ``rank_order``, splits
    are in that order (see Communicator) and are compared in group order.
    """
    try:
        mine = validate()
        record = _Record(None, str(x.dtype), tuple(x.shape[1:]), int(x.shape[0]), mine.algorithm)
    except ValueError as error:
        mine, record = None, _Record(str(error))
    records: list[_Record | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(records, record, group=group)

    problems = [f"{_name(group, r)}: {rec.error}" for r, rec in enumerate(records) if rec.error]
    if not problems:
        problems = _disagreements(group, records, equal=mine.input_splits is None)
    if not problems and mine.output_splits is not None:
        problems = _split_mismatches(group, x.device, mine, rank_order)
    if problems:
        size = dist.get_world_size(group)
        raise ValueError(f"{op}: the {size} ranks of the group disagree (check=True):\n  " + "\n  ".join(problems))
    return mine


def _disagreements(group: dist.ProcessGroup, records: list[_Record], equal: bool) -> list[str]:
    first = records[0]
    problems = []
    for r, rec in enumerate(records[1:], start=1):
        if (rec.dtype, rec.trailing) != (first.dtype, first.trailing):
            problems.append(f"{_name(group, r)} passes {rec.dtype} rows of shape {rec.trailing} but "
                            f"{_name(group, 0)} passes {first.dtype} rows of shape {first.trailing}")
        if rec.algorithm != first.algorithm:
            problems.append(f"{_name(group, r)} runs {rec.algorithm!r} but {_name(group, 0)} runs {first.algorithm!r}")
    rows = [rec.rows for rec in records]
    if equal and len(set(rows)) > 1:
        problems.append(f"dim 0 differs across ranks ({rows}); an equal-split all-to-all needs the same size on "
                        f"every rank")
    return problems


def _split_mismatches(group: dist.ProcessGroup, device: torch.device, mine: Validated,
                      rank_order: list[int] | None) -> list[str]:
    ins, expected = mine.input_splits, mine.output_splits
    if rank_order is not None:  # caller order -> group order
        ins, expected = [0] * len(ins), [0] * len(expected)
        for i, g in enumerate(rank_order):
            ins[g], expected[g] = mine.input_splits[i], mine.output_splits[i]
    # Each rank learns what every peer is about to send it: p counts.
    sent = torch.tensor(ins, dtype=torch.int64, device=device)
    arriving = torch.empty_like(sent)
    dist.all_to_all_single(arriving, sent, group=group)
    local = [(s, n, expected[s]) for s, n in enumerate(arriving.tolist()) if n != expected[s]]
    reports: list[list[tuple[int, int, int]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, (len(local), local[:MAX_REPORTED]), group=group)
    problems, total = [], 0
    for receiver, (count, shown) in enumerate(reports):
        total += count
        for source, n, want in shown:
            problems.append(f"{_name(group, source)} sends {n} rows to {_name(group, receiver)}, which expects "
                            f"{want}")
    problems = problems[:MAX_REPORTED]
    if total > len(problems):
        problems.append(f"... {total - len(problems)} more mismatched rank pairs, {total} in all")
    return problems
