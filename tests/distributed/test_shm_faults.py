"""A rank that dies while its peers wait in shared memory: the survivors
raise an error naming it, found through its lock (not the timeout), and
/dev/shm keeps nothing. Own processes, not the pool: one of them dies."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from datetime import timedelta

import pytest

from tests.conftest import _segments
from tests.harness.victim import run_with_a_victim

WORLD = 4
VICTIM = 2
TIMEOUT_S = 120  # the survivors must notice long before this


def _rank(rank: int, store_path: str, when: str, results: mp.Queue, release) -> None:
    import torch
    import torch.distributed as dist

    import alltoall

    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT_S))
        comm = alltoall.Communicator(transport="shm", timeout=TIMEOUT_S)
        x = torch.ones(WORLD * 1000, 16)
        comm.all_to_all(x, "flat")  # one exchange that works
        if rank == VICTIM:
            if when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            # "during": die in the middle of a large exchange, after posting
            # part of it (single copies make peers wait on this rank).
            threading_kill_after(0.05)
        start = time.monotonic()
        for _ in range(1000):
            comm.all_to_all(torch.ones(WORLD * 4000, 64), "flat")
        results.put((rank, "completed", "", time.monotonic() - start))
    except BaseException as error:
        results.put((rank, type(error).__name__, str(error) + traceback.format_exc(), time.monotonic() - start))
    finally:
        results.close()
        results.join_thread()  # flush the report before leaving
        # Stay until every survivor has reported: a survivor that left early
        # would drop its lock under a peer still waiting, which would then
        # name two departed ranks instead of the victim alone.
        release.wait(TIMEOUT_S)
        os._exit(0)  # without teardown: a dead peer can hang gloo's


def threading_kill_after(seconds: float) -> None:
    import threading

    threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()


@pytest.mark.parametrize("when", ["before", "during"])
def test_survivors_name_the_dead_peer(when):
    before = _segments()
    reports, victim_exit = run_with_a_victim(_rank, WORLD, VICTIM, (when,), TIMEOUT_S)
    assert victim_exit == -signal.SIGKILL
    assert sorted(reports) == [r for r in range(WORLD) if r != VICTIM]
    for rank, (kind, message, _elapsed) in reports.items():
        assert kind == "DistBackendError", f"rank {rank}: {kind}: {message}"
        assert f"group rank(s) [{VICTIM}] (global rank(s) [{VICTIM}]) left" in message, message
        assert "flat all_to_all phase 1/1 (world)" in message
        assert "timed out" not in message
    assert _segments() - before == set()
