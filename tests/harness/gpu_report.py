"""The closing report of make test-gpu, from pytest's JUnit XML.

Prints every failure, every skip with its reason and every recorded
measurement, then, last, "N passed, N failed" (", N skipped" when any).
``--extra "name=passed"`` (or ``=failed ...`` / ``=skipped: reason``) adds a
check that ran outside pytest, such as the compute-sanitizer pass. Exits 1
when anything failed or nothing passed.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> list[tuple[str, str, str]]:
    """(test, outcome, detail) for every test case in a JUnit file."""
    found = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        props = ", ".join(f"{p.get('name')}={p.get('value')}" for p in case.iter("property"))
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            found.append((name, "failed", (bad.get("message") or "").splitlines()[0][:300] if bad.get("message")
                          else ""))
        elif skipped is not None:
            found.append((name, "skipped", skipped.get("message") or "no reason given"))
        else:
            found.append((name, "passed", props))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("junit", nargs="+")
    parser.add_argument("--extra", action="append", default=[], help="name=passed|failed ...|skipped: reason")
    args = parser.parse_args(argv)
    results = [r for path in args.junit for r in outcomes(path)]
    for extra in args.extra:
        name, _, status = extra.partition("=")
        outcome = status.split(":")[0].split(" ")[0]
        results.append((name, outcome, status[len(outcome):].lstrip(": ")))
    counts = {k: sum(1 for r in results if r[1] == k) for k in ("passed", "failed", "skipped")}
    for name, outcome, detail in results:
        if outcome == "passed" and detail:
            print(f"MEASURED {name}: {detail}")
    for name, outcome, detail in results:
        if outcome == "skipped":
            print(f"SKIPPED {name}: {detail}")
    for name, outcome, detail in results:
        if outcome == "failed":
            print(f"FAILED {name}: {detail}")
    line = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["skipped"]:
        line += f", {counts['skipped']} skipped"
    print(line)
    return 1 if counts["failed"] or not counts["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
