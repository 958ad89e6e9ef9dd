"""alltoall-info: the package, its build, torch and its backends (the
"alltoall" torch.distributed backend included), and the topology when run
under a launcher (torchrun, mpiexec, srun)."""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.distributed as dist

import alltoall
from alltoall._library import _C
from alltoall.backend import BACKEND_NAME, is_registered
from alltoall.launch import detect_launcher, init_distributed


def build_lines(machine: bool = True) -> list[str]:
    """The package, its build, torch, python. ``machine=False`` leaves out
    where it is installed and the host name (for reports that get shared)."""
    info = _C.build_info()
    where = f" ({os.path.dirname(alltoall.__file__)})" if machine else ""
    lines = [f"alltoall {alltoall.__version__}{where}"]
    if info["cuda"]:
        runtime = info.get("nccl_runtime")
        nccl = ".".join(map(str, info["nccl_headers"]))
        lines.append(f"build: C++ + CUDA (runtime {info['cuda_runtime']}), NCCL headers {nccl}, NCCL runtime {runtime}")
    else:
        lines.append("build: C++ only (no CUDA kernels in this build)")
    backends = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                      ("mpi", dist.is_mpi_available())) if ok]
    lines.append(f"torch {torch.__version__}: CUDA {torch.version.cuda or 'none'}, "
                 f"{torch.cuda.device_count()} GPU(s) visible, backends {', '.join(backends) or 'none'}")
    state = "registered" if is_registered() else "NOT registered"
    lines.append(f"torch.distributed backend '{BACKEND_NAME}': {state} (init_process_group(\"{BACKEND_NAME}\"); "
                 f"devices cpu, cuda)")
    host = f" on {platform.node()}" if machine else ""
    lines.append(f"python {platform.python_version()}{host} ({platform.machine()})")
    return lines


def transport_lines(comm: alltoall.Communicator) -> list[str]:
    """What carries each phase of each algorithm, as rank 0 sees it."""
    lines = [f"transport: {comm.transport} (ALLTOALL_TRANSPORT; shm inside a host, c10d between hosts)"]
    for algorithm in ("flat", "hierarchical"):
        try:
            phases = comm.exchanger(algorithm).plan.phases
        except (KeyError, ValueError) as error:
            lines.append(f"  {algorithm}: not available ({error})")
            continue
        described = [f"{p.role} over {kind} ({link})"
                     for p, kind, link in zip(phases, comm.transports(algorithm), comm.links(algorithm), strict=True)]
        lines.append(f"  {algorithm}: " + ("; ".join(described) or "no phase (one rank)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alltoall-info", description=__doc__)
    parser.add_argument("--local-size", type=int, default=None, help="emulate nodes of this many ranks")
    parser.add_argument("--transport", default=None, help="auto, shm or c10d (default ALLTOALL_TRANSPORT, else auto)")
    args = parser.parse_args(argv)
    if detect_launcher() is None:
        print("\n".join(build_lines()))
        print("topology: not under a launcher (run with torchrun, mpiexec or srun to detect it)")
        return 0
    launch = init_distributed()
    try:
        comm = alltoall.Communicator(local_size=args.local_size, transport=args.transport)
        topo = comm.topology
        if dist.get_rank() == 0:
            print("\n".join(build_lines()))
            print(f"launcher: {launch.launcher}, backend: {launch.backend}, world size {launch.world_size}")
            print(f"topology: {topo.describe()}")
            for node in range(topo.num_nodes):
                host = topo.hostnames[topo.ranks_of_node(node)[0]] if topo.hostnames else "emulated"
                print(f"  node {node} ({host}): ranks {list(topo.ranks_of_node(node))}")
            for line in transport_lines(comm):
                print(line)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
