"""How the time of one exchange is spread: the same call, repeated for a
while, in rounds of ``--calls`` calls after a barrier (as alltoall-bench
times), each round's slowest-rank mean kept.

Run under a launcher, e.g. on the emulated 4x2 cluster:

  sudo .venv/bin/python bench/emulated_cluster.py --nodes 4 --nproc-per-node 2 --rate 1gbit -- \\
      .venv/bin/python bench/round_times.py --size 1M --seconds 20

or on one host with emulated nodes (``--local-size 4``). Prints the
deciles of the round times, and the median of each 2-second window (a slow
period of seconds shows there, scatter from round to round in the deciles).

``--alternate ALGORITHM`` runs a round of that algorithm (untimed) before
each timed round, as the bench's rounds alternate algorithms; ``--gap S``
sleeps S seconds before each round, leaving the connections idle;
``--zeros`` sends zeros (as the calibration does) instead of random
values; ``--idle-groups N`` first creates N more gloo groups of the world
and keeps them, unused, while it times (each has a thread that wakes every
10 ms). Each was used to test what makes flat over emulated TCP slow
(docs/performance.md, "Validation").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import alltoall
from alltoall.cli.bench_traffic import parse_size
from alltoall.launch import init_distributed

WINDOW_S = 2.0


def round_times(comm: alltoall.Communicator, x: torch.Tensor, algorithm: str, calls: int, seconds: float,
                alternate: str | None, gap: float) -> list[tuple[float, float]]:
    """(seconds since the start, the slowest rank's mean us per call) of every round; the same on every rank."""
    for _ in range(calls):
        comm.all_to_all(x, algorithm)
    rows: list[tuple[float, float]] = []
    start = time.perf_counter()
    while not rows or rows[-1][0] < seconds:
        if gap:
            time.sleep(gap)
        if alternate:
            dist.barrier()
            for _ in range(calls):
                comm.all_to_all(x, alternate)
        dist.barrier()
        begin = time.perf_counter()
        for _ in range(calls):
            comm.all_to_all(x, algorithm)
        end = time.perf_counter()
        # Every rank takes the slowest rank's time and the latest clock, so all stop together.
        both = torch.tensor([(end - begin) / calls * 1e6, end - start], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        us, at = both.tolist()
        rows.append((at, us))
    return rows


def summary(rows: list[tuple[float, float]]) -> list[str]:
    times = sorted(us for _, us in rows)
    deciles = [times[i * len(times) // 10] for i in range(10)]
    windows: dict[int, list[float]] = {}
    for at, us in rows:
        windows.setdefault(int(at // WINDOW_S), []).append(us)
    return [f"rounds {len(times)}, median {statistics.median(times):.0f} us, max {times[-1]:.0f} us",
            "deciles (us): " + " ".join(f"{d:.0f}" for d in deciles),
            f"median of each {WINDOW_S:.0f} s window (us): "
            + " ".join(f"{statistics.median(v):.0f}" for _, v in sorted(windows.items()))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1 << 20, help="bytes per rank (default 1M)")
    parser.add_argument("--algorithm", default="flat")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--calls", type=int, default=10, help="calls per round (default 10, as the bench)")
    parser.add_argument("--alternate", default=None, help="an algorithm run (untimed) before each round")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds of sleep before each round")
    parser.add_argument("--zeros", action="store_true", help="send zeros instead of random values")
    parser.add_argument("--idle-groups", type=int, default=0, help="unused gloo groups kept alive while timing")
    parser.add_argument("--local-size", type=int, default=None, help="emulated nodes of this many ranks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed()
    try:
        idle = [dist.new_group(backend="gloo") for _ in range(args.idle_groups)]
        comm = alltoall.Communicator(local_size=args.local_size)
        elements = max(comm.size, args.size // 4 // comm.size * comm.size)
        x = torch.zeros(elements) if args.zeros else torch.randn(elements)
        rows = round_times(comm, x, args.algorithm, args.calls, args.seconds, args.alternate, args.gap)
        if dist.get_rank() == 0:
            print(f"{comm.topology.describe()}; {args.algorithm} at {args.size} B per rank, "
                  f"rounds of {args.calls} calls" + (f" after a round of {args.alternate}" if args.alternate else "")
                  + (f", {args.gap} s idle before each" if args.gap else "") + (", zeros" if args.zeros else "")
                  + (f", {args.idle_groups} idle gloo groups" if args.idle_groups else ""))
            print("\n".join(summary(rows)))
        del idle
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
