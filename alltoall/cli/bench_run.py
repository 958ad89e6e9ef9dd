"""The timed sweep of alltoall-bench.

For each size, every algorithm runs on the same input: ``warmup`` untimed
calls each, then the ``iterations`` timed calls in rounds that alternate the
algorithms (so slow drifts of a shared machine stay out of the ratios), each
round after a barrier, then ``checks`` calls whose output each rank verifies
locally. A rank's time is
its mean per call; the row reports the maximum over ranks (also the mean and
minimum), and ``#wrong`` summed over ranks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alltoall.cli import bench_check
from alltoall.cli.bench_algorithms import REGISTRY, BenchContext, Exchange, base_name
from alltoall.cli.bench_traffic import SplitsSpec, traffic_matrix


@dataclass(frozen=True)
class SweepOptions:
    sizes: list[int]  # bytes per rank
    dtype_name: str
    dtype: torch.dtype
    iterations: int
    warmup: int
    checks: int
    seed: int
    rounds: int
    splits: SplitsSpec


@dataclass(frozen=True)
class Measurement:
    """One row of the table.

    ``size`` is bytes sent per rank; ``count`` elements per peer (the mean
    for uneven splits). Times are microseconds per call: the maximum, mean
    and minimum over ranks of each rank's mean. ``wrong`` is None when no
    check ran.
    """

    algorithm: str
    size: int
    count: int
    time_us: float
    time_us_avg: float
    time_us_min: float
    wrong: int | None
    world_size: int

    @property
    def algbw(self) -> float:
        """GB/s (1e9 bytes per second): bytes per rank over time."""
        return self.size / (self.time_us * 1e3) if self.time_us > 0 else 0.0

    @property
    def busbw(self) -> float:
        """algbw * (n-1)/n: an all-to-all keeps 1/n of its data local."""
        return self.algbw * (self.world_size - 1) / self.world_size


class Progress:
    """A one-line bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done = total, 0
        self.enabled = enabled and sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:<28}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(call: Callable[[], object], count: int, device: torch.device) -> float:
    """Mean seconds per call over ``count`` calls."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        call()
    _synchronize(device)
    return (time.perf_counter() - start) / max(count, 1)


def round_sizes(iterations: int, rounds: int) -> list[int]:
    """``iterations`` split into ``rounds`` near-equal parts (none empty)."""
    rounds = max(1, min(rounds, iterations))
    return [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]


Workloads = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def measure_size(ctx: BenchContext, runners: dict[str, Exchange], workloads: Workloads, send: list[int],
                 recv: list[int], opts: SweepOptions) -> dict[str, tuple[float, int]]:
    """Per algorithm: this rank's mean seconds per call and its wrong count.

    The timed calls are split into ``opts.rounds`` rounds; each round runs
    every algorithm once, starting one further along the list than the last,
    so each algorithm sees the same share of the machine's slow drifts.
    Isolated algorithms (MPI) run all their rounds in a phase of their own,
    after their own barrier: MPICH busy-polls, and a rank released late by
    another library's barrier makes its peers spin away whole time slices
    when ranks outnumber cores, which is not how its users see it.
    """
    uniform = opts.splits.uniform
    names = list(runners)
    calls = {name: (lambda ex=runners[name], x=workloads[name][0]: ex(x, send, recv, uniform)) for name in names}
    for name in names:
        for _ in range(opts.warmup):
            calls[name]()
    seconds = dict.fromkeys(names, 0.0)
    rounds = round_sizes(opts.iterations, opts.rounds) if opts.iterations else []
    isolated = [n for n in names if REGISTRY[base_name(n)].isolated]
    shared = [n for n in names if n not in isolated]
    for r, count in enumerate(rounds):
        for k in range(len(shared)):
            name = shared[(r + k) % len(shared)]
            _synchronize(ctx.device)
            dist.barrier(group=ctx.comm.group)
            seconds[name] += _time_calls(calls[name], count, ctx.device) * count
    for name in isolated:
        barrier = REGISTRY[base_name(name)].barrier
        for count in rounds:
            _synchronize(ctx.device)
            dist.barrier(group=ctx.comm.group)
            if barrier is not None:
                barrier()
            seconds[name] += _time_calls(calls[name], count, ctx.device) * count
    corrupted = bench_check.corrupted_algorithm()
    results = {}
    for name in names:
        wrong = 0
        for _ in range(opts.checks):
            out = calls[name]()
            if corrupted == name:
                out = bench_check.corrupt(out)
            expected = workloads[name][1]
            assert expected is not None
            wrong += bench_check.count_wrong(out, expected)
        results[name] = (seconds[name] / opts.iterations if opts.iterations else 0.0, wrong)
    return results


def _reduce(ctx: BenchContext, seconds: float, wrong: int) -> tuple[float, float, float, int]:
    """(max, mean, min) of the ranks' times and the sum of wrong counts."""
    group = ctx.comm.group
    high = torch.tensor([seconds, -seconds], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    total = torch.tensor([seconds, float(wrong)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    t_max, neg_min = high.tolist()
    t_sum, wrong_sum = total.tolist()
    return t_max, t_sum / ctx.world_size, -neg_min, round(wrong_sum)


def sweep(ctx: BenchContext, runners: dict[str, Exchange], opts: SweepOptions,
          show_progress: bool) -> list[Measurement]:
    """Every size, every algorithm; the same rows on every rank."""
    element = torch.empty((), dtype=opts.dtype).element_size()
    n, rank = ctx.world_size, ctx.rank
    progress = Progress(len(opts.sizes), show_progress and rank == 0)
    rows: list[Measurement] = []
    try:
        for size in opts.sizes:
            elements = size // element
            matrix = traffic_matrix(opts.splits, n, elements, opts.seed)
            send = matrix[rank]
            recv = [row[rank] for row in matrix]
            x = bench_check.make_input(opts.seed, rank, sum(send), opts.dtype, ctx.device)
            expected = None
            if opts.checks:
                expected = bench_check.expected_output(opts.seed, rank, matrix, opts.dtype, ctx.device)
            workloads: Workloads = {}
            for name in runners:
                custom = REGISTRY[base_name(name)].workload
                workloads[name] = custom(ctx, opts.seed, matrix, opts.dtype) if custom else (x, expected)
            progress.step(f"{size} B")
            for name, (seconds, wrong) in measure_size(ctx, runners, workloads, send, recv, opts).items():
                t_max, t_avg, t_min, wrong_sum = _reduce(ctx, seconds, wrong)
                rows.append(Measurement(name, size, elements // n, t_max * 1e6, t_avg * 1e6, t_min * 1e6,
                                        wrong_sum if opts.checks else None, n))
    finally:
        progress.close()
    return rows
