"""One rank of the multi-node suite. Start it with any launcher, from the
repository root:

    torchrun --nnodes 2 --nproc-per-node 4 ... -m tests.multinode.rank_checks --out DIR
    mpiexec -n 4 python -m tests.multinode.rank_checks --out DIR --local-size 2
    srun -N 2 --ntasks-per-node 4 python -m tests.multinode.rank_checks --out DIR

It initialises torch.distributed through ``alltoall.launch.init_distributed``
and, for every placement asked for, detects the topology and runs the
exchange checks. Each rank writes ``DIR/rank<global rank>.json`` (what it
saw, how many comparisons passed, or the error) and exits non-zero on any
failure.

Placements: ``launch`` keeps the launcher's ranks; ``cyclic`` re-creates the
default group with rank ``local_rank * nodes + node`` (Slurm's
``--distribution=cyclic``) on the same store, so hosts hold interleaved ranks.

Suite ``fault`` instead runs exchanges in a loop until ``--fault-rank``
kills (SIGKILL) or stops (SIGSTOP) itself at iteration ``--fault-at``; the
other ranks record the error they get and when, then exit with status 3
(a failed rank must fail its launcher: torchrun agents whose workers all
succeed wait up to 5 minutes at an exit barrier for the failed host's agent).

Backend: ``ALLTOALL_TEST_BACKEND`` (gloo by default; nccl puts tensors on
``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import alltoall
from alltoall.launch import LaunchInfo, init_distributed
from tests.multinode.exchange_checks import CHECKS

BACKEND_ENV = "ALLTOALL_TEST_BACKEND"
FAULT_SEEN_EXIT = 3
# How long a survivor of a fault waits for its host peers' reports: past the
# Communicator timeout (every survivor fails by then) with room for 2 loaded cores.
FAULT_REPORT_WAIT_SLACK_S = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for rank<r>.json reports (shared by all hosts)")
    parser.add_argument("--suite", choices=["core", "fault"], default="core")
    parser.add_argument("--placements", default="launch", help="comma list of: launch, cyclic")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma list of: {', '.join(CHECKS)}")
    parser.add_argument("--local-size", type=int, default=None, help="emulate nodes of this many ranks")
    parser.add_argument("--timeout", type=float, default=60.0, help="Communicator timeout, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rank", type=int, default=-1)
    parser.add_argument("--fault-at", type=int, default=5, help="iteration at which the fault rank fails")
    parser.add_argument("--fault-signal", choices=["KILL", "STOP"], default="KILL")
    parser.add_argument("--fault-iterations", type=int, default=400)
    return parser.parse_args(argv)


def device_for(backend: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if "nccl" in backend else torch.device("cpu")


def describe_topology(comm: alltoall.Communicator) -> dict[str, Any]:
    topo = comm.topology
    return {
        "rank": comm.rank,
        "node_of_rank": list(topo.node_of_rank),
        "hostnames": list(topo.hostnames) if topo.hostnames else None,
        "num_nodes": topo.num_nodes,
        "ranks_per_node": topo.ranks_per_node,
        "consecutive": topo.consecutive,
        "emulated": topo.emulated,
        "local_rank": topo.local_rank,
        "describe": topo.describe(),
    }


def run_placement(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    comm = alltoall.Communicator(local_size=args.local_size, timeout=args.timeout)
    result = {"topology": describe_topology(comm), "checks": {},
              "transports": {alg: list(comm.transports(alg)) for alg in ("flat", "hierarchical")
                             if comm.topology.uniform or alg == "flat"}}
    for name in args.checks.split(","):
        result["checks"][name] = CHECKS[name](comm, device, args.seed)
    return result


def reinit_cyclic(backend: str, node_rank: int, local_rank: int, ranks_per_node: int, timeout: float) -> int:
    """Replaces the default group by one where this process has rank
    ``local_rank * nodes + node_rank``, on the launcher's store."""
    store = dist.distributed_c10d._get_default_store()  # kept alive by this reference
    world = dist.get_world_size()
    nodes = world // ranks_per_node
    rank = local_rank * nodes + node_rank
    dist.barrier()
    dist.destroy_process_group()
    dist.init_process_group(backend, store=dist.PrefixStore("cyclic", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    return rank


def core_suite(args: argparse.Namespace, launch: LaunchInfo, report: dict[str, Any]) -> None:
    device = device_for(launch.backend, launch.local_rank)
    placements = args.placements.split(",")
    report["placements"] = {}
    for placement in placements:
        if placement == "cyclic":
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or args.local_size
            if not ranks_per_node:
                raise ValueError("the cyclic placement needs LOCAL_WORLD_SIZE or --local-size")
            report["cyclic_rank"] = reinit_cyclic(launch.backend, launch.rank // ranks_per_node,
                                                  launch.rank % ranks_per_node, ranks_per_node, args.timeout)
        elif placement != "launch":
            raise ValueError(f"unknown placement {placement!r}")
        report["placements"][placement] = run_placement(args, device)
    dist.barrier()


def fault_suite(args: argparse.Namespace, launch: LaunchInfo, report: dict[str, Any]) -> None:
    device = device_for(launch.backend, launch.local_rank)
    comm = alltoall.Communicator(timeout=args.timeout)
    report["topology"] = describe_topology(comm)
    report["host_ranks"] = list(comm.topology.ranks_of_node(comm.topology.node))
    x = torch.arange(4 * comm.size, dtype=torch.float32, device=device)
    algorithms = ("hierarchical", "flat") if comm.topology.uniform else ("flat",)
    for i in range(args.fault_iterations):
        if comm.rank == args.fault_rank and i == args.fault_at:
            with open(os.path.join(args.out, "fault.json"), "w") as f:
                json.dump({"rank": comm.rank, "signal": args.fault_signal, "at": time.time(), "iteration": i}, f)
            os.kill(os.getpid(), getattr(signal, f"SIG{args.fault_signal}"))
        algorithm = algorithms[i % len(algorithms)]
        started = time.time()
        try:
            comm.all_to_all(x, algorithm)
        except RuntimeError as error:
            report["failure"] = {"iteration": i, "algorithm": algorithm, "message": str(error),
                                 "call_started": started, "at": time.time()}
            return
    raise AssertionError(f"{args.fault_iterations} exchanges finished although rank {args.fault_rank} failed")


def wait_for_host_peers(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Waits, bounded, until every rank on this host but the failed one has
    written its report (the fault suite records the host's ranks)."""
    peers = [r for r in report.get("host_ranks", []) if r != args.fault_rank]
    deadline = time.monotonic() + args.timeout + FAULT_REPORT_WAIT_SLACK_S
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(args.out, f"rank{r}.json")) for r in peers):
            return
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    backend = os.environ.get(BACKEND_ENV, "gloo")
    report: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid(), "error": None}
    rank = None
    try:
        launch = init_distributed(backend=backend, timeout=args.timeout)
        rank = launch.rank
        report["launch"] = {"launcher": launch.launcher, "rank": launch.rank, "world_size": launch.world_size,
                            "local_rank": launch.local_rank, "backend": launch.backend,
                            "master_addr": os.environ.get("MASTER_ADDR"), "master_port": os.environ.get("MASTER_PORT")}
        (core_suite if args.suite == "core" else fault_suite)(args, launch, report)
    except BaseException:
        report["error"] = traceback.format_exc()
    path = os.path.join(args.out, f"rank{rank if rank is not None else 'unknown-' + str(os.getpid())}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    failed = report["error"] is not None
    if failed:
        print(f"rank {rank}: FAILED\n{report['error']}", file=sys.stderr, flush=True)
    if args.suite == "fault" or failed:
        # After a fault the group is broken: tearing it down could block, so
        # leave without it. But not before every survivor on this host has
        # reported: a launcher ends its other workers when one exits, and a
        # peer that detects the fault later (shared memory, then a TCP phase,
        # on loaded cores) must still report. A fixed grace raced that.
        if args.suite == "fault":
            wait_for_host_peers(args, report)
        sys.stdout.flush()
        os._exit(1 if failed else FAULT_SEEN_EXIT)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
