"""Times torch's all_to_all_single, alltoall's flat and its hierarchical
all-to-all across a sweep of sizes, on whatever launcher started it
(torchrun, mpiexec, srun; on the emulated cluster, bench/emulated_cluster.py).

A stop-gap until ``alltoall-bench`` lands; it uses only the public API.

    python bench/emulated_cluster.py --nodes 2 --nproc-per-node 4 --rate 1gbit -- \\
        .venv/bin/python bench/multinode_timing.py -b 1K -e 4M -f 4 --json bench/results/emu-2x4.json

Size is bytes per rank (the whole send buffer, as nccl-tests counts it),
float32. For each size, repetitions run the three algorithms in turn, each
timing ``--iters`` back-to-back exchanges after a barrier; a repetition's
time is the slowest rank's mean, and the reported time is the median over
repetitions. Ratios are against torch in the same run. Every algorithm's
first output is checked against torch's before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import alltoall
from alltoall.launch import init_distributed

ALGORITHMS = ("torch", "flat", "hierarchical")


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    if text[-1:] in units and text[-1:]:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def sizes(begin: int, end: int, factor: int) -> list[int]:
    out, size = [], begin
    while size <= end:
        out.append(size)
        size *= factor
    return out


def exchange_fn(comm: alltoall.Communicator, algorithm: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if algorithm == "torch":
        def run(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x)
            return out
        return run
    return lambda x: comm.all_to_all(x, algorithm)


def time_once(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int) -> float:
    """The slowest rank's mean seconds per exchange over ``iters``."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        run(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def plot(path: str, header: dict, rows: list[dict], algorithms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes_ = [row["bytes_per_rank"] for row in rows]
    for a in algorithms:
        ax.plot(sizes_, [row["seconds"][a] * 1e3 for row in rows], marker="o", label=a)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes per rank")
    ax.set_ylabel("ms per all-to-all (median of reps, slowest rank)")
    ax.set_title(f"{header['topology']}\n{header['backend']}, link rate {header['link_rate'] or 'not emulated'}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--begin", default="1K")
    parser.add_argument("-e", "--end", default="4M")
    parser.add_argument("-f", "--factor", type=int, default=4)
    parser.add_argument("-n", "--iters", type=int, default=10)
    parser.add_argument("-w", "--warmup", type=int, default=3)
    parser.add_argument("-r", "--reps", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here (rank 0)")
    parser.add_argument("--plot", default=None, help="plot time per size to this PNG (rank 0, needs matplotlib)")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    launch = init_distributed(timeout=args.timeout)
    device = torch.device("cuda", torch.cuda.current_device()) if launch.backend == "nccl" else torch.device("cpu")
    comm = alltoall.Communicator(timeout=args.timeout)
    p, rank = comm.size, comm.rank
    algorithms = [a for a in ALGORITHMS if a != "hierarchical" or comm.topology.uniform]
    runs = {a: exchange_fn(comm, a) for a in algorithms}
    rows = []
    for size in sizes(parse_size(args.begin), parse_size(args.end), args.factor):
        elements = max(1, size // 4 // p) * p
        x = torch.randn(elements, generator=torch.Generator().manual_seed(rank)).to(device)
        expected = runs["torch"](x)
        for a in algorithms:
            if not torch.equal(runs[a](x), expected):
                raise AssertionError(f"{a} differs from torch at {size} bytes per rank")
            for _ in range(args.warmup):
                runs[a](x)
        samples: dict[str, list[float]] = {a: [] for a in algorithms}
        for rep in range(args.reps):
            for a in algorithms[rep % len(algorithms):] + algorithms[:rep % len(algorithms)]:
                samples[a].append(time_once(runs[a], x, args.iters))
        median = {a: statistics.median(s) for a, s in samples.items()}
        rows.append({"bytes_per_rank": elements * 4, "seconds": median, "samples": samples,
                     "ratio_to_torch": {a: median[a] / median["torch"] for a in algorithms}})
    if rank == 0:
        topo = comm.topology
        header = {"launcher": launch.launcher, "backend": launch.backend, "world_size": p,
                  "topology": topo.describe(), "hosts": sorted(set(topo.hostnames or [socket.gethostname()])),
                  "iters": args.iters, "reps": args.reps, "torch": torch.__version__,
                  "link_rate": os.environ.get("ALLTOALL_EMULATED_RATE")}
        print(f"# {header['topology']}, {launch.backend}, link rate {header['link_rate'] or 'not emulated'}")
        print(f"# {'bytes/rank':>10} " + " ".join(f"{a + ' us':>16}" for a in algorithms)
              + " " + " ".join(f"{a + '/torch':>18}" for a in algorithms if a != "torch"))
        for row in rows:
            print(f"  {row['bytes_per_rank']:>10} " + " ".join(f"{row['seconds'][a] * 1e6:>16.1f}" for a in algorithms)
                  + " " + " ".join(f"{row['ratio_to_torch'][a]:>18.2f}" for a in algorithms if a != "torch"))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=1)
        if args.plot:
            plot(args.plot, header, rows, algorithms)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
