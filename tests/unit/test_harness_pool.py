"""The distributed tests' rank pool leaves no process behind when the test
session that owns it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_OWNER = r"""
import os, sys, time
from tests.harness.pool import WorldPool
from tests.harness.pool_bodies import rank_and_pid
pool = WorldPool(2)
print(" ".join(str(pid) for _rank, pid in pool.run(rank_and_pid)), flush=True)
time.sleep(1000)
"""


def _gone(pid: int, seconds: float = 20) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_rank_processes_die_with_a_killed_session():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2, f"the pool did not run: {pids}"
        assert all(not _gone(pid, 0) for pid in pids), "rank processes ended before their owner"
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
    finally:
        owner.kill()
    survivors = [pid for pid in pids if not _gone(pid)]
    assert not survivors, f"rank processes {survivors} outlived the killed session"
