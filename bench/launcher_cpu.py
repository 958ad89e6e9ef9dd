"""Does the launcher change what a flat exchange costs? (issue 21, item 4)

Runs the same loop of ``Communicator.all_to_all(x, "flat")`` (1 KiB per
rank) under whichever launcher started it, and prints, as the mean over
ranks: wall time per call, the calling thread's CPU per call, and the whole
process's CPU per call (every thread: gloo's, MPI's, the store's). A
launcher or library whose threads spin shows as process CPU well above the
calling thread's.

  .venv/bin/torchrun --standalone --nproc-per-node 8 bench/launcher_cpu.py
  .venv/bin/mpiexec -n 8 .venv/bin/python bench/launcher_cpu.py
  .venv/bin/mpiexec -n 8 -genv WITH_MPI_CALLS 1 .venv/bin/python bench/launcher_cpu.py

With ``WITH_MPI_CALLS=1`` (under mpiexec) the ranks first run 200
``MPI_Alltoall`` calls, so MPI's progress machinery has been used. Each line
also lists the process's threads, its CPU affinity and OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import alltoall
from alltoall.launch import init_distributed


def mpi_calls(world: int) -> None:
    import numpy as np
    from mpi4py import MPI

    send = np.ones(1024 * world, dtype=np.uint8)
    recv = np.empty_like(send)
    for _ in range(200):
        MPI.COMM_WORLD.Alltoall(send, recv)
    MPI.COMM_WORLD.Barrier()


def thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(names)


def measure(calls: int) -> tuple[float, float, float]:
    comm = alltoall.Communicator()
    x = torch.randn(256)
    for _ in range(100):
        comm.all_to_all(x, "flat")
    dist.barrier()
    wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
    for _ in range(calls):
        comm.all_to_all(x, "flat")
    return ((time.perf_counter() - wall) / calls * 1e6, (time.thread_time() - thread) / calls * 1e6,
            (time.process_time() - process) / calls * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    launch = init_distributed()
    try:
        if os.environ.get("WITH_MPI_CALLS") == "1":
            mpi_calls(dist.get_world_size())
        values = torch.tensor(measure(args.calls), dtype=torch.float64)
        dist.all_reduce(values)
        values /= dist.get_world_size()
        if dist.get_rank() == 0:
            wall, thread, process = values.tolist()
            print(f"launcher {launch.launcher}, {dist.get_world_size()} ranks, MPI calls first: "
                  f"{os.environ.get('WITH_MPI_CALLS') == '1'}; per call: wall {wall:.0f} us, calling-thread CPU "
                  f"{thread:.1f} us, process CPU {process:.1f} us; OMP_NUM_THREADS="
                  f"{os.environ.get('OMP_NUM_THREADS')}, affinity {sorted(os.sched_getaffinity(0))}, "
                  f"threads {thread_names()}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
