"""Runs pytest on the same tests again and again, optionally with busy
processes taking the cores, and reports how many runs failed: the hunt for
tests that pass or fail by chance (races, fixed sleeps, timing).

    python -m tests.harness.repeat --runs 20 --load 2 -- tests/distributed/test_shm_faults.py

``make test-repeat`` runs it on the fault and multinode tests. Each failed
run's output is kept in ``--logs`` (default: a new temporary folder). Exits 1
when any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time


def _spin() -> None:
    # A busy process at normal priority, as a neighbour job would be.
    while True:
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="how many times to run the tests")
    parser.add_argument("--load", type=int, default=0, help="busy processes to keep running meanwhile")
    parser.add_argument("--logs", default=None, help="folder for the output of failed runs")
    parser.add_argument("pytest_args", nargs="+", help="tests and pytest options (after --)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.load < 0:
        parser.error(f"--runs={args.runs} must be >= 1 and --load={args.load} >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = args.logs or tempfile.mkdtemp(prefix="alltoall-repeat-")
    os.makedirs(logs, exist_ok=True)
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for proc in spinners:
        proc.start()
    failed: list[int] = []
    try:
        for run in range(1, args.runs + 1):
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args],
                                  capture_output=True, text=True)
            tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
            print(f"run {run}/{args.runs}: exit {done.returncode} in {time.monotonic() - started:.0f} s: {tail[0]}",
                  flush=True)
            if done.returncode != 0:
                failed.append(run)
                with open(os.path.join(logs, f"run{run}.log"), "w") as f:
                    f.write(done.stdout + done.stderr)
    finally:
        for proc in spinners:
            proc.kill()
            proc.join()
    print(f"{args.runs - len(failed)} of {args.runs} runs passed with {args.load} busy processes"
          + (f"; failed runs {failed}, logs in {logs}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
