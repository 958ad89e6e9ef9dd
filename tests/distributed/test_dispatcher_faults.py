"""A rank SIGKILLed during the expert dispatcher's dispatch or combine (2
emulated nodes x 2 ranks, shared memory): every survivor raises within the
timeout, naming the dispatcher's phase and the peer it waited for, the
victim's direct peers find it dead through its lock, and /dev/shm keeps
nothing. Own processes, not the pool: one of them dies."""

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
TIMEOUT_S = 15  # ranks not linked to the victim wait this long for a peer that gave up
# In a 2 x 2 cluster the victim (node 1, local rank 0) shares the rail with
# rank 0 and the node with rank 3; rank 1 only meets peers that have failed.
DIRECT_PEERS = (0, 3)


def _rank(rank: int, store_path: str, when: str, results: mp.Queue, release) -> None:
    import torch
    import torch.distributed as dist

    import alltoall

    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=3 * TIMEOUT_S))
        comm = alltoall.Communicator(local_size=2, transport="shm", timeout=TIMEOUT_S)
        d = alltoall.ExpertDispatcher(comm, 8, mode="dedup")
        g = torch.Generator().manual_seed(rank)
        for step in range(1000):
            x = torch.randn(64, 32, generator=g)
            index = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(64)])
            if rank == VICTIM and step == 2 and when == "dispatch":
                os.kill(os.getpid(), signal.SIGKILL)
            start = time.monotonic()
            recv, handle = d.dispatch(x, index, torch.rand(64, 4, generator=g))
            if rank == VICTIM and step == 2 and when == "combine":
                os.kill(os.getpid(), signal.SIGKILL)
            start = time.monotonic()
            d.combine(recv, handle)
        results.put((rank, "completed", "", time.monotonic() - start))
    except BaseException as error:
        results.put((rank, type(error).__name__, str(error) + traceback.format_exc(), time.monotonic() - start))
    finally:
        results.close()
        results.join_thread()
        release.wait(3 * TIMEOUT_S)  # keep the lock until every survivor has reported
        os._exit(0)


@pytest.mark.parametrize("when", ["dispatch", "combine"])
def test_survivors_name_the_phase_and_the_peer(when):
    before = _segments()
    reports, victim_exit = run_with_a_victim(_rank, WORLD, VICTIM, (when,), 6 * TIMEOUT_S)
    assert victim_exit == -signal.SIGKILL
    assert sorted(reports) == [r for r in range(WORLD) if r != VICTIM]
    for rank, (kind, message, elapsed) in reports.items():
        assert kind == "DistBackendError", f"rank {rank}: {kind}: {message}"
        assert f"ExpertDispatcher {when}" in message, message
        assert "group rank(s) [" in message, message
        assert elapsed < 2 * TIMEOUT_S, f"rank {rank} took {elapsed:.1f} s"
        if rank in DIRECT_PEERS:
            assert f"(global rank(s) [{VICTIM}]) left" in message, message
    assert _segments() - before == set()
