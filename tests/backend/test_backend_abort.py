"""``abort()`` and ``shutdown()`` of a process group of the alltoall backend
(issue 24): they mark the group's shared-memory segments failed on that
rank, so its peers, whether already waiting in an exchange or entering the
next one, raise well before the timeout, naming the rank. gloo offers no
abort of its own, so this is a shared-memory test."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import alltoall  # noqa: F401  (registers the "alltoall" backend in the rank processes)

TIMEOUT_S = 60.0  # the peers must raise long before it: they read the abort word, not the clock
SHM = {"ALLTOALL_TRANSPORT": "shm", "ALLTOALL_SHM_RING_BYTES": "1024", "ALLTOALL_SHM_SINGLE_COPY_BYTES": "4096"}


def _one_rank_aborts(how: str) -> tuple[str, float]:
    rank, p = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == "alltoall"
    side = dist.new_group(backend="gloo")  # to meet at the end, outside the aborted group
    x = torch.full((p * 256, 8), float(rank))
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)  # the exchangers and their segments exist
    assert out[::256, 0].tolist() == [float(s) for s in range(p)]
    dist.barrier(group=side)
    if rank == p - 1:
        # The others are already waiting for this rank in their next exchange.
        time.sleep(1.0)
        getattr(dist.group.WORLD, how)()
        with pytest.raises(RuntimeError, match=r"aborted|shut down"):  # and this rank's next call raises at once
            dist.all_to_all_single(out, x)
        dist.barrier(group=side)  # stay until the others have seen it
        return "aborted", 0.0
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        for _ in range(100):
            dist.all_to_all_single(out, x)
    elapsed = time.monotonic() - start
    dist.barrier(group=side)
    return str(info.value), elapsed


@pytest.mark.parametrize("how", ["abort", "shutdown"])
@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
def test_abort_of_one_rank_stops_its_peers(world_pools, how, algorithm):
    env = {**SHM, "ALLTOALL_LOCAL_SIZE": "2", "ALLTOALL_ALGORITHM": algorithm}
    results = world_pools.run(4, _one_rank_aborts, how, env=env, backend="alltoall", deadline_s=2 * TIMEOUT_S,
                              collective_timeout_s=TIMEOUT_S)
    reason = "aborted on this rank (abort())" if how == "abort" else "shut down on this rank (shutdown())"
    for rank, (message, elapsed) in enumerate(results[:-1]):
        assert "global rank 3" in message and reason in message, f"rank {rank}: {message}"
        # 1 s of it is rank 3's sleep before it aborts.
        assert elapsed < 10.0, f"rank {rank} raised after {elapsed:.1f} s: the timeout, not the abort word"
    assert results[-1] == ("aborted", 0.0)
