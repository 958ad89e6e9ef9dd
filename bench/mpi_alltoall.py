"""MPICH's MPI_Alltoall on its own: the baseline a CPU user who picks MPI
gets, with no torch process group in the job (BASELINES.md's method).

    .venv/bin/mpiexec -n 8 .venv/bin/python bench/mpi_alltoall.py [--sizes 1K,16K,256K,4M]

Prints, per size in bytes per rank, the slowest rank's mean time per call.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1K,16K,256K,4M", help="bytes per rank, comma-separated")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        send = np.ones(size, dtype=np.uint8)
        recv = np.empty_like(send)
        iterations = 200 if size < 1 << 20 else 30
        for _ in range(10):
            comm.Alltoall(send, recv)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(iterations):
            comm.Alltoall(send, recv)
        slowest = comm.allreduce((time.perf_counter() - start) / iterations, op=MPI.MAX)
        if comm.Get_rank() == 0:
            print(f"{size:>10d} B  {slowest * 1e6:10.1f} us", flush=True)


if __name__ == "__main__":
    main()
