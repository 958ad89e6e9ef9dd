"""Where a flat exchange's time goes, against raw ``all_to_all_single``.

Run under a launcher, one size per run (bytes per rank):

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
``apply`` (the executor through ``AllToAll.apply``, i.e. with autograd's
bookkeeping), ``communicator`` (``Communicator.all_to_all(x, "flat")``, the
public API).

``--backend alltoall`` makes the default group an "alltoall" group, so
``torch`` and ``process-group`` run this library's plan through its c10d
backend (issue 11's "no measurable overhead"): ``torch`` minus
``process-group`` is torch.distributed's own Python wrapper, the same for any
backend (run once with ``--backend gloo`` to see it there too), and
``process-group`` minus ``executor`` is what the backend adds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import alltoall
from alltoall.launch import init_distributed
from alltoall.ops.autograd import AllToAll


def measure(size: int, rounds: int, calls: int) -> dict[str, tuple[float, float]]:
    comm = alltoall.Communicator()
    x = torch.randn(size // 4)
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
        "apply": lambda: AllToAll.apply(x, executor),
        "communicator": lambda: comm.all_to_all(x, "flat"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", type=int, nargs="?", default=1024, help="bytes per rank (default 1024)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=100, help="calls per variant per round")
    parser.add_argument("--backend", default=None, help='the default group\'s backend, e.g. "alltoall" (default: '
                        "gloo on CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed(args.backend)
    try:
        results = measure(args.size, args.rounds, args.calls)
        if dist.get_rank() == 0:
            print(f"{dist.get_world_size()} ranks, backend {dist.get_backend()}, {args.size} B per rank, "
                  f"{args.rounds} x {args.calls} calls; "
                  "per call, mean over ranks:")
            print(f"{'variant':<16}{'wall (us)':>12}{'thread CPU (us)':>18}")
            for name, (wall, cpu) in results.items():
                print(f"{name:<16}{wall:>12.1f}{cpu:>18.1f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
