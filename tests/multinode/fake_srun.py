"""Stands in for srun's per-node task launch (there is no Slurm here): starts
this node's tasks with the variables srun gives a job step, and exits with
the first non-zero task status.

    python -m tests.multinode.fake_srun --nodes 2 --node-index 0 --ntasks-per-node 2 \\
        --nodelist 'node[0-1]' --distribution cyclic -- python -m tests.multinode.rank_checks ...

Task ids follow srun's ``--distribution``: block puts tasks ``[i*G, (i+1)*G)``
on node i, cyclic puts task t on node ``t % nodes``. No torch import, so the
tasks start at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def task_ids(node_index: int, nodes: int, per_node: int, distribution: str) -> list[int]:
    if distribution == "block":
        return [node_index * per_node + local for local in range(per_node)]
    return [local * nodes + node_index for local in range(per_node)]


def step_environment(task: int, local: int, args: argparse.Namespace) -> dict[str, str]:
    total = args.nodes * args.ntasks_per_node
    return {
        "SLURM_JOB_ID": str(args.job_id), "SLURM_JOBID": str(args.job_id),
        "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
        "SLURM_PROCID": str(task), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(args.node_index),
        "SLURM_NTASKS": str(total), "SLURM_NPROCS": str(total), "SLURM_STEP_NUM_TASKS": str(total),
        "SLURM_NNODES": str(args.nodes), "SLURM_JOB_NUM_NODES": str(args.nodes),
        "SLURM_STEP_NUM_NODES": str(args.nodes),
        "SLURM_JOB_NODELIST": args.nodelist, "SLURM_NODELIST": args.nodelist, "SLURM_STEP_NODELIST": args.nodelist,
        "SLURM_TASKS_PER_NODE": f"{args.ntasks_per_node}(x{args.nodes})",
        "SLURM_STEP_TASKS_PER_NODE": f"{args.ntasks_per_node}(x{args.nodes})",
        "SLURM_DISTRIBUTION": args.distribution,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--node-index", type=int, required=True)
    parser.add_argument("--ntasks-per-node", type=int, required=True)
    parser.add_argument("--nodelist", required=True)
    parser.add_argument("--distribution", choices=["block", "cyclic"], default="block")
    parser.add_argument("--job-id", type=int, default=4242)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    tasks = task_ids(args.node_index, args.nodes, args.ntasks_per_node, args.distribution)
    procs = [subprocess.Popen(command, env={**os.environ, **step_environment(task, local, args)})
             for local, task in enumerate(tasks)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
