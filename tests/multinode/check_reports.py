"""Checks the reports of a rank_checks run on a real cluster: every rank
passed, and the topology every rank detected is where the ranks really ran
(each report holds its own host name).

    python -m tests.multinode.check_reports DIR --world-size 16 [--placements launch,cyclic]

Exits non-zero, naming what is wrong, on any failure. The emulated suite
(tests/multinode/test_suite.py) makes the same assertions with host names it
knows in advance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.multinode.reports import assert_topology, assert_transports, expected_counts, read_reports


def check(out: Path, world_size: int, placements: list[str]) -> list[str]:
    reports = read_reports(out)
    problems = [f"rank {r}: {rep['error']}" for r, rep in reports.items() if rep.get("error")]
    if problems:
        return problems
    if sorted(reports, key=str) != list(range(world_size)):
        return [f"reports from ranks {sorted(reports, key=str)}, expected 0..{world_size - 1}"]
    hosts = [reports[r]["hostname"] for r in range(world_size)]
    by_rank = {"launch": hosts}
    if "cyclic" in placements:
        cyclic = [""] * world_size
        for r in range(world_size):
            cyclic[reports[r]["cyclic_rank"]] = hosts[r]
        by_rank["cyclic"] = cyclic
    for r in range(world_size):
        for placement in placements:
            seen = reports[r]["placements"][placement]
            rank = r if placement == "launch" else reports[r]["cyclic_rank"]
            try:
                assert_topology(seen["topology"], by_rank[placement], rank)
                assert_transports(seen["transports"], by_rank[placement], reports[r]["launch"]["backend"])
                assert seen["checks"] == expected_counts(world_size, list(seen["checks"]))
            except AssertionError as error:
                problems.append(f"rank {r}, placement {placement}: {error}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--placements", default="launch")
    args = parser.parse_args(argv)
    problems = check(args.out, args.world_size, args.placements.split(","))
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        reports = read_reports(args.out)
        launch = reports[0]["launch"]
        hosts = sorted({rep["hostname"] for rep in reports.values()})
        print(f"ok: {args.world_size} ranks on {len(hosts)} host(s) {hosts}, launcher {launch['launcher']}, "
              f"backend {launch['backend']}, placements {args.placements}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
