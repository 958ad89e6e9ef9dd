"""A finished asynchronous exchange lets its input go at ``wait()`` (or at an
``is_completed()`` that returns True), not at the Communicator's next call
(issue 24): the progress thread's task held a reference to the input's
storage until then, so a caller that dropped its input kept the memory."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import alltoall
from tests.harness.checks import rank_input


def _storage_refs(x: torch.Tensor) -> int:
    """References to x's storage: one per tensor (view or alias) that uses it."""
    return torch._C._storage_Use_Count(x.untyped_storage()._cdata)


def _released() -> list[tuple[str, int, int, int]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2 if world % 2 == 0 else None)
    seen = []
    for how in ("wait", "is_completed", "wait_v"):
        x = rank_input(rank, 4 * world, (64,), torch.float32, seed=len(seen))
        before = _storage_refs(x)
        if how == "wait_v":
            work = comm.all_to_all_v(x, [4] * world, None, async_op=True)
        else:
            work = comm.all_to_all(x, async_op=True)
        queued = _storage_refs(x)  # the task's alias of the input, held until the handle releases it
        if how == "is_completed":
            deadline = time.monotonic() + 60
            while not work.is_completed():
                assert time.monotonic() < deadline, "the exchange did not complete within 60 s"
                time.sleep(0.001)
            after = _storage_refs(x)
            work.wait()
        else:
            work.wait()
            after = _storage_refs(x)
        # No further call on comm in between: the release is the handle's.
        seen.append((how, before, queued, after))
    comm.synchronize()
    return seen


def test_a_finished_exchange_releases_its_input_at_wait(worlds):
    for seen in worlds.run(2, _released):
        for how, before, queued, after in seen:
            # While it runs, the exchange may hold views of its own as well.
            assert queued >= before + 1, f"{how}: the queued task should hold the input ({before} -> {queued})"
            assert after == before, f"{how}: the input is still held after the exchange finished ({after} > {before})"

