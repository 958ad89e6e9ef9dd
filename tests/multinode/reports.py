"""What the pytest side of the multi-node suite needs: the rank script's
command line, its reports, and what they should say."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alltoall.testing import HostResult
from tests.multinode import exchange_checks as ec

ROOT = str(Path(__file__).resolve().parents[2])


def rank_checks_argv(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.multinode.rank_checks", "--out", str(out), *args]


def expected_counts(world_size: int, checks: Sequence[str] = tuple(ec.CHECKS)) -> dict[str, int]:
    """Comparisons each check makes, from its parameters (subgroups need 4 ranks)."""
    counts = {
        "equal": len(ec.DTYPES) * len(ec.TRAILING) * len(ec.ROWS_PER_PEER) * (len(ec.ALGORITHMS) + 2),
        "large": 2,
        "v": len(ec.V_SEEDS) * (2 * len(ec.ALGORITHMS) + 2),
        "backward": 2,
        "subgroups": 2 if world_size >= 4 else 0,
        "coordinated": 12 if world_size >= 4 else 0,
        "moe": 5 if world_size >= 4 else 4,
    }
    return {name: counts[name] for name in checks}


def logs(results: Sequence[HostResult], lines: int = 60) -> str:
    return "".join(f"\n--- {r.host.hostname}: exit {r.returncode} ---\n" + "\n".join(r.log().splitlines()[-lines:])
                   for r in results)


def read_reports(out: Path) -> dict[int | str, dict[str, Any]]:
    reports: dict[int | str, dict[str, Any]] = {}
    for path in out.glob("rank*.json"):
        key = path.stem[len("rank"):]
        reports[int(key) if key.isdigit() else key] = json.loads(path.read_text())
    return reports


def assert_all_ranks_passed(results: Sequence[HostResult], out: Path, world_size: int) -> dict[int, dict[str, Any]]:
    """Every host exited 0 and every rank reported, without an error."""
    reports = read_reports(out)
    errors = {r: rep["error"] for r, rep in reports.items() if rep.get("error")}
    assert not errors, "ranks failed:" + "".join(f"\n--- rank {r} ---\n{e}" for r, e in sorted(errors.items(), key=str))
    assert all(r.returncode == 0 for r in results), "a host's launcher failed:" + logs(results)
    assert sorted(reports) == list(range(world_size)), f"reports from ranks {sorted(reports, key=str)}" + logs(results)
    return reports  # type: ignore[return-value]


def numbered(hosts_by_rank: Sequence[str]) -> list[int]:
    """Node ids by first appearance, as Topology numbers them."""
    ids: dict[str, int] = {}
    return [ids.setdefault(h, len(ids)) for h in hosts_by_rank]


def assert_transports(seen: dict[str, list[str]], hosts_by_rank: Sequence[str], backend: str) -> None:
    """Shared memory inside a host, the backend between hosts: the flat
    exchange spans hosts, the hierarchical one has an intra-host phase."""
    spans = len(set(hosts_by_rank)) > 1
    c10d = f"c10d:{backend}"
    host_tensors = backend != "nccl"
    assert seen["flat"] == [c10d if spans or not host_tensors else "shm"], seen
    if "hierarchical" in seen and spans:
        assert seen["hierarchical"] == ["shm" if host_tensors else c10d, c10d], seen


def assert_topology(seen: dict[str, Any], hosts_by_rank: Sequence[str], rank: int) -> None:
    """A rank's detected topology is the emulated layout."""
    nodes = numbered(hosts_by_rank)
    per_node = {nodes.count(n) for n in set(nodes)}
    assert seen["rank"] == rank
    assert seen["hostnames"] == list(hosts_by_rank), f"rank {rank} saw hosts {seen['hostnames']}"
    assert seen["node_of_rank"] == nodes
    assert seen["num_nodes"] == len(set(nodes))
    assert seen["ranks_per_node"] == (per_node.pop() if len(per_node) == 1 else None)
    assert seen["consecutive"] == (nodes == sorted(nodes))
    assert seen["emulated"] is False
    assert seen["local_rank"] == [r for r in range(len(nodes)) if nodes[r] == nodes[rank]].index(rank)
