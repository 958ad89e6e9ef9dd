"""Tests whose rank processes are their own, because one of them dies: spawn
them, collect the survivors' reports, and only then let every survivor leave
(one that left early would drop its shared-memory lock under a peer still
waiting, which would then name two departed ranks)."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from collections.abc import Callable


def run_with_a_victim(target: Callable, world: int, victim: int, args: tuple, timeout_s: float
                      ) -> tuple[dict[int, tuple], int | None]:
    """Runs ``target(rank, store_path, *args, results, release)`` on ``world``
    spawned ranks; each survivor puts ``(rank, *report)`` on ``results`` and
    waits on ``release``. Returns the reports by rank (without the rank) and
    the victim's exit code."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    release = ctx.Event()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, os.path.join(tmp, "store"), *args, results, release))
                 for r in range(world)]
        for p in procs:
            p.start()
        reports: dict[int, tuple] = {}
        try:
            for _ in range(world - 1):
                rank, *report = results.get(timeout=timeout_s)
                reports[rank] = tuple(report)
        finally:
            release.set()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return reports, procs[victim].exitcode
