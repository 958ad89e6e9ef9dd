"""The multi-node suite on emulated hosts: every host a network namespace
with its own address, host name and 1 Gbit/s link, every rank a process
started by torchrun (or a stand-in for srun) on its host.

Each launch runs tests/multinode/rank_checks.py on every rank; the ranks
check exchanges against ``dist.all_to_all_single`` themselves and report
what they saw (topology, comparisons made, errors) as JSON, which is
asserted here.

``ALLTOALL_TEST_BACKEND=nccl`` runs the same launches with NCCL, each host
seeing its own GPUs; without enough GPUs those tests skip saying so.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest
import torch

from alltoall.testing import Host
from tests.multinode import check_reports
from tests.multinode.reports import (
    ROOT,
    assert_all_ranks_passed,
    assert_topology,
    assert_transports,
    expected_counts,
    logs,
    rank_checks_argv,
    read_reports,
)

pytestmark = pytest.mark.multinode

BACKEND = os.environ.get("ALLTOALL_TEST_BACKEND", "gloo")
LAUNCH_DEADLINE_S = float(os.environ.get("MN_DEADLINE", "300"))
RATE = "1gbit"


def backend_env(nodes: int, per_node: int):
    """Per-host environment: with NCCL, each host sees only its own GPUs."""
    if BACKEND != "nccl":
        return None
    visible = torch.cuda.device_count()
    if visible < nodes * per_node:
        pytest.skip(f"ALLTOALL_TEST_BACKEND=nccl: {nodes}x{per_node} emulated hosts need {nodes * per_node} "
                    f"CUDA GPUs, {visible} visible")

    def env(host: Host) -> dict[str, str]:
        gpus = range(host.index * per_node, (host.index + 1) * per_node)
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}

    return env


@pytest.mark.parametrize("nodes,per_node", [(2, 4), (4, 2)], ids=["2x4", "4x2"])
def test_core_suite_under_torchrun(cluster_factory, tmp_path, nodes, per_node):
    """Topology from host names, then flat, hierarchical, v, backward and
    subgroup exchanges; first as torchrun placed the ranks (host-major), then
    with the default group rebuilt in cyclic order."""
    env = backend_env(nodes, per_node)
    world = nodes * per_node
    with cluster_factory(nodes, rate=RATE) as cluster:
        results = cluster.run_torchrun(per_node, rank_checks_argv(tmp_path, "--placements", "launch,cyclic"),
                                       timeout=LAUNCH_DEADLINE_S, cwd=ROOT, env=env)
        leftover = cluster.running_processes()
        names = [h.hostname for h in cluster.hosts]
    reports = assert_all_ranks_passed(results, tmp_path, world)
    assert all(not pids for pids in leftover.values()), f"processes left running: {leftover}"
    block = [names[r // per_node] for r in range(world)]
    cyclic = [names[r % nodes] for r in range(world)]
    for rank, report in reports.items():
        assert report["launch"]["launcher"] == "torchrun"
        assert report["launch"]["backend"] == BACKEND
        assert report["hostname"] == block[rank], f"rank {rank} ran on {report['hostname']}"
        assert report["cyclic_rank"] == (rank % per_node) * nodes + rank // per_node
        launch, cyc = report["placements"]["launch"], report["placements"]["cyclic"]
        assert_topology(launch["topology"], block, rank)
        assert_topology(cyc["topology"], cyclic, report["cyclic_rank"])
        assert launch["checks"] == expected_counts(world), f"rank {rank}"
        assert cyc["checks"] == expected_counts(world), f"rank {rank}, cyclic"
        assert_transports(launch["transports"], block, BACKEND)
        assert_transports(cyc["transports"], cyclic, BACKEND)
    # The checker for real clusters, which learns the hosts from the reports, agrees.
    assert check_reports.check(tmp_path, world, ["launch", "cyclic"]) == []


def test_slurm_bootstrap_with_cyclic_distribution(cluster_factory, tmp_path):
    """srun's variables (here set by a stand-in, as srun --distribution=cyclic
    would): ranks, the rendezvous host from the node list and the port from
    the job id, across hosts whose names resolve through their hosts file."""
    nodes, per_node = 2, 2
    env = backend_env(nodes, per_node)
    world = nodes * per_node
    with cluster_factory(nodes, rate=RATE) as cluster:
        nodelist = f"node[0-{nodes - 1}]"

        def fake_srun(host: Host) -> list[str]:
            return [sys.executable, "-m", "tests.multinode.fake_srun", f"--nodes={nodes}",
                    f"--node-index={host.index}", f"--ntasks-per-node={per_node}", f"--nodelist={nodelist}",
                    "--distribution=cyclic", "--", *rank_checks_argv(tmp_path, "--checks", "equal,v")]

        results = cluster.run(fake_srun, timeout=LAUNCH_DEADLINE_S, cwd=ROOT, env=env)
        names = [h.hostname for h in cluster.hosts]
        address_of_node0 = cluster.hosts[0].address
    reports = assert_all_ranks_passed(results, tmp_path, world)
    cyclic = [names[r % nodes] for r in range(world)]
    for rank, report in reports.items():
        assert report["launch"]["launcher"] == "slurm"
        assert report["launch"]["master_addr"] == "node0"  # the node list's first host...
        assert report["hostname"] == cyclic[rank]
        assert_topology(report["placements"]["launch"]["topology"], cyclic, rank)
        assert report["placements"]["launch"]["checks"] == expected_counts(world, ["equal", "v"])
    assert address_of_node0 == "10.231.0.1"  # ...which every host resolves to host 0


FAULT_TIMEOUT_S = 6.0
# Scheduling on a loaded 2-core machine, on top of the configured timeout.
FAULT_SLACK_S = 10.0
ERROR_NAMING = re.compile(
    r"alltoall: (flat|hierarchical) all_to_all phase \d/\d \((world|intra_node|inter_node)\) "
    r"on group '[^']+' \(global ranks \[[\d, ]+\], this rank is \d+ of \d+(; shared memory on host [^)]+)?\) "
    r"failed \(timeout 6000 ms\)"
)


@pytest.mark.parametrize("fault", ["KILL", "STOP"], ids=["killed", "stopped"])
def test_a_failed_rank_fails_the_others_within_the_timeout(cluster_factory, tmp_path, fault):
    """Rank 3 (host 1) kills or stops itself mid-run. Every rank on host 0
    then fails within the Communicator timeout with an error naming the
    collective and the group; afterwards nothing runs in any namespace.

    Killed: the survivors see closed connections, their launchers end by
    themselves. Stopped: the survivors time out; the stopped rank never ends,
    so the harness kills it, as it would any hung test."""
    nodes, per_node, victim = 2, 2, 3
    env = backend_env(nodes, per_node)
    argv = rank_checks_argv(tmp_path, "--suite", "fault", "--fault-rank", str(victim), "--fault-at", "4",
                            "--fault-signal", fault, "--timeout", str(FAULT_TIMEOUT_S))
    survivors = [0, 1]  # host 0; host 1's launcher may end rank 2 before it reports
    with cluster_factory(nodes, rate=RATE) as cluster:
        if fault == "KILL":
            results = cluster.run_torchrun(per_node, argv, timeout=LAUNCH_DEADLINE_S, cwd=ROOT, env=env)
            # Every launcher ends by itself, reporting the failure of its ranks.
            assert all(r.returncode != 0 for r in results), logs(results)
        else:
            started = [cluster.popen(h, cluster.torchrun_argv(h, per_node, argv), cwd=ROOT,
                                     env=env(h) if env else None) for h in cluster.hosts]
            deadline = time.monotonic() + LAUNCH_DEADLINE_S
            while not all((tmp_path / f"rank{r}.json").exists() for r in survivors):
                assert time.monotonic() < deadline, "survivors never reported"
                time.sleep(0.2)
            assert started[1][0].poll() is None, "host 1 ended although its rank 3 is stopped"
            cluster.kill_processes()
        leftover = cluster.running_processes()
    assert all(not pids for pids in leftover.values()), f"processes left running: {leftover}"

    fault_record = json.loads((tmp_path / "fault.json").read_text())
    assert fault_record["rank"] == victim and fault_record["signal"] == fault
    reports = read_reports(tmp_path)
    assert victim not in reports, "the failed rank should not have reported"
    for rank in [r for r in reports if r != victim]:
        report = reports[rank]
        assert report["error"] is None, report["error"]
        failure = report["failure"]
        assert failure is not None, f"rank {rank} finished every exchange although rank {victim} failed"
        assert ERROR_NAMING.search(failure["message"]), f"rank {rank}: {failure['message']}"
        waited = failure["at"] - fault_record["at"]
        assert waited < FAULT_TIMEOUT_S + FAULT_SLACK_S, f"rank {rank} failed {waited:.1f} s after the fault"
        if fault == "STOP":
            assert "timed out" in failure["message"].lower() or "timeout" in failure["message"].lower()
    assert set(survivors) <= set(reports)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL path: needs at least 2 CUDA GPUs, "
                    f"{torch.cuda.device_count()} visible (on GPUs run the suite with ALLTOALL_TEST_BACKEND=nccl)")
def test_core_suite_with_nccl(cluster_factory, tmp_path):
    """The core suite on 2 emulated hosts with NCCL, each host seeing half of the GPUs."""
    per_node = torch.cuda.device_count() // 2
    env = {"ALLTOALL_TEST_BACKEND": "nccl"}
    with cluster_factory(2, rate=None) as cluster:
        results = cluster.run_torchrun(
            per_node, rank_checks_argv(tmp_path), timeout=LAUNCH_DEADLINE_S, cwd=ROOT,
            env=lambda h: {**env, "CUDA_VISIBLE_DEVICES": ",".join(
                str(g) for g in range(h.index * per_node, (h.index + 1) * per_node))})
    reports = assert_all_ranks_passed(results, tmp_path, 2 * per_node)
    assert {r["launch"]["backend"] for r in reports.values()} == {"nccl"}
