"""Rows and bytes the ExpertDispatcher sends per rank, dedup against
replicate (exact counters), and the calling thread's CPU time of one
dispatch + combine, forward and backward (time.thread_time, median of
rounds), on the same uniform routing.

    torchrun --nproc-per-node 8 bench/dispatcher_bytes.py --local-size 4
    torchrun --nproc-per-node 8 bench/dispatcher_bytes.py --local-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import alltoall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    comm = alltoall.Communicator(local_size=args.local_size)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=g, requires_grad=True)
    index = torch.stack([torch.randperm(args.experts, generator=g)[:args.k] for _ in range(args.tokens)])
    weights = torch.rand(args.tokens, args.k, generator=g, requires_grad=True)
    rows = {}
    for mode, algorithm in (("dedup", "flat"), ("replicate", "flat"), ("replicate", "hierarchical")):
        if algorithm == "hierarchical" and comm.topology.num_nodes == 1:
            continue
        d = alltoall.ExpertDispatcher(comm, args.experts, mode=mode, algorithm=algorithm)
        cpu = []
        for _ in range(args.rounds + 1):
            dist.barrier()
            start = time.thread_time()
            recv, handle = d.dispatch(x, index, weights)
            d.combine(recv * 2, handle).sum().backward()
            cpu.append(time.thread_time() - start)
        totals = torch.tensor([d.stats()["dispatch_rows_inter"], d.stats()["dispatch_rows_intra"],
                               d.stats()["dispatch_bytes_inter"]], dtype=torch.float64) / (args.rounds + 1)
        dist.all_reduce(totals)
        ms = torch.tensor([statistics.median(cpu[1:]) * 1e3])
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        rows[f"{mode}-{algorithm}"] = [*(totals / dist.get_world_size()).tolist(), float(ms)]
    if rank == 0:
        print(f"{comm.topology.describe()}; S={args.tokens} M={args.hidden} E={args.experts} k={args.k}; per rank "
              "per dispatch (mean over ranks); CPU ms = slowest rank's median calling-thread CPU time of "
              "dispatch+combine fwd+bwd")
        base = rows["replicate-flat"]
        for name, (inter, intra, inter_bytes, ms) in rows.items():
            ratio = inter_bytes / base[2] if base[2] else float("nan")
            print(f"{name:24s} rows_inter {inter:8.1f}  rows_intra {intra:8.1f}  bytes_inter {inter_bytes:10.0f} "
                  f"({ratio:.3f}x replicate-flat)  CPU {ms:7.1f} ms ({ms / base[3]:.2f}x)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
