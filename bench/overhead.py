"""Where a flat exchange's time goes, against raw ``all_to_all_single``.

**CPU per call of each entry point at world 1** (issue 21), self-launched,
one process, nothing to exchange, so what is measured is the per-call path:

  .venv/bin/python bench/overhead.py --entry-points

prints, for each public entry point, the calling thread's CPU time per call
(``time.thread_time`` over ``--calls`` calls, ``--rounds`` rounds in
rotating order): the best round, the median and the worst, and the best as a
multiple of torch's ``dist.all_to_all_single`` on a gloo group in the same
run. Runs unchanged against an older checkout (PYTHONPATH), for before/after.

**Per layer, at any world size:** run under a launcher, one size per run
(bytes per rank):

  .venv/bin/torchrun --standalone --nproc-per-node 2 bench/overhead.py 1024

Each variant is called in rounds that rotate their order. Reported per call,
as the mean over ranks: wall time, and the CPU time of the calling thread
(what the caller spends outside the backend's worker threads). On a host with
fewer cores than ranks, every microsecond of CPU a rank spends is paid about
ranks/cores times in wall time, so the thread CPU is the figure to compare.

Variants: ``torch`` (``out = empty_like(x); dist.all_to_all_single(out, x)``),
``process-group`` (the same call minus torch.distributed's Python wrapper:
``group.all_to_all_single(out, x, [], [], opts).wait()``, the C++ entry point
the wrapper calls), ``executor`` (the C++ plan executor, no Python layer),
``communicator`` (``Communicator.all_to_all(x, "flat")``, the public API),
``communicator-grad`` (the same with an input that requires grad: the
forward and its autograd node).

``--backend alltoall`` makes the default group an "alltoall" group, so
``torch`` and ``process-group`` run this library's plan through its c10d
backend (issue 11's "no measurable overhead"): ``torch`` minus
``process-group`` is torch.distributed's own Python wrapper, the same for any
backend (run once with ``--backend gloo`` to see it there too), and
``process-group`` minus ``executor`` is what the backend adds.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import alltoall
from alltoall.launch import init_distributed


def measure(size: int, rounds: int, calls: int) -> dict[str, tuple[float, float]]:
    comm = alltoall.Communicator()
    x = torch.randn(size // 4)
    x_grad = x.clone().requires_grad_()
    executor = comm.exchanger("flat")

    def raw() -> torch.Tensor:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x)
        return out

    group = dist.group.WORLD
    options = dist.AllToAllOptions()

    def process_group() -> torch.Tensor:
        out = torch.empty_like(x)
        group.all_to_all_single(out, x, [], [], options).wait()
        return out

    variants = {
        "torch": raw,
        "process-group": process_group,
        "executor": lambda: executor.all_to_all(x),
        "communicator": lambda: comm.all_to_all(x, "flat"),
        "communicator-grad": lambda: comm.all_to_all(x_grad, "flat"),
    }
    names = list(variants)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for fn in variants.values():
        for _ in range(20):
            fn()
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            dist.barrier()
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                variants[name]()
            wall[name] += time.perf_counter() - t
            cpu[name] += time.thread_time() - c
    per_call = 1e6 / (rounds * calls)
    totals = torch.tensor([wall[n] * per_call for n in names] + [cpu[n] * per_call for n in names],
                          dtype=torch.float64)
    dist.all_reduce(totals)
    totals /= dist.get_world_size()
    values = totals.tolist()
    return {n: (values[i], values[len(names) + i]) for i, n in enumerate(names)}


# Issue 21's bounds on CPU per call at world 1: microseconds, and a multiple
# of gloo's all_to_all_single in the same run.
TARGETS = {"Communicator.all_to_all": 8.0, "Communicator.all_to_all, requires_grad": 14.0,
           "Communicator.all_to_all_v, output splits": 8.0}
TARGET_RATIO = 0.4
GLOO = "dist.all_to_all_single, gloo group"


def entry_points(rows: int) -> dict[str, object]:
    """Every public entry point of a 1-rank exchange of ``rows`` float32s."""
    comm = alltoall.Communicator()
    alltoall_group = dist.new_group([0], backend="alltoall")
    gloo_group = dist.new_group([0], backend="gloo")
    x = torch.randn(rows)
    x_grad = x.clone().requires_grad_()
    splits = [rows]
    executor = comm.exchanger("flat")

    def single(group: dist.ProcessGroup):
        def call() -> torch.Tensor:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x, group=group)
            return out
        return call

    return {
        "Communicator.all_to_all": lambda: comm.all_to_all(x),
        "Communicator.all_to_all, requires_grad": lambda: comm.all_to_all(x_grad),
        "Communicator.all_to_all_v, output splits": lambda: comm.all_to_all_v(x, splits, splits),
        "Communicator.all_to_all_v, output splits, requires_grad": lambda: comm.all_to_all_v(x_grad, splits, splits),
        "Communicator.all_to_all_v, splits exchanged": lambda: comm.all_to_all_v(x, splits),
        "Communicator.all_to_all_v, splits exchanged, requires_grad": lambda: comm.all_to_all_v(x_grad, splits),
        "alltoall.all_to_all": lambda: alltoall.all_to_all(x),
        "alltoall.all_to_all_v, output splits": lambda: alltoall.all_to_all_v(x, splits, splits),
        'dist.all_to_all_single, "alltoall" group': single(alltoall_group),
        GLOO: single(gloo_group),
        "floor: the C++ Exchanger.all_to_all": lambda: executor.all_to_all(x),
        "floor: torch.empty_like": lambda: torch.empty_like(x),
    }


def measure_entry_points(size: int, rounds: int, calls: int) -> dict[str, list[float]]:
    """Microseconds of calling-thread CPU per call, one value per round."""
    variants = entry_points(size // 4)
    names = list(variants)
    for fn in variants.values():  # warm: allocator, caches, auto's memo
        for _ in range(200):
            fn()
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            fn = variants[name]
            start = time.thread_time()
            for _ in range(calls):
                fn()
            per_round[name].append((time.thread_time() - start) * 1e6 / calls)
    return per_round


def report_entry_points(per_round: dict[str, list[float]], size: int, rounds: int, calls: int) -> None:
    gloo_best = min(per_round[GLOO])
    gloo_median = statistics.median(per_round[GLOO])
    print(f"world 1, {size} B, {rounds} rounds x {calls} calls; calling-thread CPU per call (us), "
          f"ratios against gloo's all_to_all_single in this run")
    print(f"{'entry point':<58}{'best':>7}{'median':>8}{'worst':>8}{'best/gloo':>11}{'med/gloo':>10}  target")
    for name, values in per_round.items():
        best, median = min(values), statistics.median(values)
        target = ""
        if name in TARGETS:
            ok = best <= TARGETS[name] and best <= TARGET_RATIO * gloo_best
            target = f"<= {TARGETS[name]:g} us and <= {TARGET_RATIO}x gloo: {'met' if ok else 'NOT met'}"
        print(f"{name:<58}{best:>7.2f}{median:>8.2f}{max(values):>8.2f}{best / gloo_best:>11.2f}"
              f"{median / gloo_median:>10.2f}  {target}")


def run_entry_points(size: int, rounds: int, calls: int) -> None:
    """World 1, self-initialised over a file store."""
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), 1), rank=0, world_size=1)
        try:
            per_round = measure_entry_points(size, rounds, calls)
            gc.collect()  # the Communicator goes before its groups (docs/bench.md, known limits)
        finally:
            dist.destroy_process_group()
    report_entry_points(per_round, size, rounds, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", type=int, nargs="?", default=1024, help="bytes per rank (default 1024)")
    parser.add_argument("--entry-points", action="store_true",
                        help="CPU per call of every entry point at world 1, self-launched (issue 21)")
    parser.add_argument("--rounds", type=int, default=None, help="default 30; 7 with --entry-points")
    parser.add_argument("--calls", type=int, default=None, help="calls per variant per round (default 100; "
                        "3000 with --entry-points)")
    parser.add_argument("--backend", default=None, help='the default group\'s backend, e.g. "alltoall" (default: '
                        "gloo on CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.entry_points:
        run_entry_points(args.size, args.rounds or 7, args.calls or 3000)
        return
    rounds, calls = args.rounds or 30, args.calls or 100
    init_distributed(args.backend)
    try:
        results = measure(args.size, rounds, calls)
        if dist.get_rank() == 0:
            print(f"{dist.get_world_size()} ranks, backend {dist.get_backend()}, {args.size} B per rank, "
                  f"{rounds} x {calls} calls; "
                  "per call, mean over ranks:")
            print(f"{'variant':<18}{'wall (us)':>12}{'thread CPU (us)':>18}")
            for name, (wall, cpu) in results.items():
                print(f"{name:<18}{wall:>12.1f}{cpu:>18.1f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
