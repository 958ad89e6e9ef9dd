"""Asynchronous exchanges (``async_op=True``): several in flight, waited in
and out of order, interleaved with synchronous calls; autograd through the
handles; the coordinated exchange; a dropped handle; a peer killed while an
exchange is in flight."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.ops.work import Work
from tests.harness.checks import assert_same_bytes, rank_input


def _expected_equal(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out


def _expected_v(x: torch.Tensor, ins: list[int], outs: list[int]) -> torch.Tensor:
    out = x.new_empty((sum(outs), *x.shape[1:]))
    dist.all_to_all_single(out, x, outs, ins)
    return out


def _splits(world: int, seed: int) -> list[list[int]]:
    """matrix[s][d]: rows rank s sends to rank d, zeros included."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (world, world), generator=g).tolist()


def _many_in_flight(algorithm: str) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    # References first: torch.distributed on the same group must not run
    # while exchanges are queued (Communicator.synchronize).
    equal = [rank_input(rank, 3 * world * (i + 1), (5,), torch.float32, seed=i) for i in range(3)]
    matrix = _splits(world, 7)
    ins, outs = matrix[rank], [matrix[s][rank] for s in range(world)]
    uneven = rank_input(rank, sum(ins), (2, 3), torch.float64, seed=9)
    expected = [_expected_equal(x) for x in equal] + [_expected_v(uneven, ins, outs)]

    checked = 0
    for order in ("in order", "reversed", "sync in between"):
        works: list[Work] = [comm.all_to_all(x, algorithm, async_op=True) for x in equal[:2]]
        if order == "sync in between":  # a synchronous call queues behind the work in flight
            assert_same_bytes(comm.all_to_all(equal[2], algorithm), expected[2], "sync")
            checked += 1
        else:
            works.append(comm.all_to_all(equal[2], algorithm, async_op=True))
        works.append(comm.all_to_all_v(uneven, ins, None, algorithm, async_op=True))
        want = expected[:2] + ([] if order == "sync in between" else [expected[2]]) + [expected[3]]
        indices = list(range(len(works)))
        if order == "reversed":
            indices.reverse()
        for i in indices:
            got = works[i].wait()
            if isinstance(got, tuple):
                got, received = got
                assert received == outs
            assert works[i].is_completed()
            assert_same_bytes(got, want[i], f"{order} work {i}")
            assert works[i].wait() is not None  # a second wait returns the same
            checked += 1
    comm.synchronize()
    assert comm.progress.in_flight == 0
    return checked


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
def test_several_exchanges_in_flight_complete_in_order(worlds, algorithm):
    assert worlds.run(4, _many_in_flight, algorithm) == [4 + 4 + 4] * 4


def _autograd_through_handles() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator()
    x = rank_input(rank, 2 * world, (3,), torch.float64, seed=1).requires_grad_()
    probe = rank_input(rank, 2 * world, (3,), torch.float64, seed=2)
    matrix = _splits(world, 3)
    ins = matrix[rank]
    xv = rank_input(rank, sum(ins), (3,), torch.float64, seed=4).requires_grad_()

    work, work_v = comm.all_to_all(x, async_op=True), comm.all_to_all_v(xv, ins, None, async_op=True)
    out = work.wait()
    out_v, received = work_v.wait()
    assert out.requires_grad and out_v.requires_grad
    probe_v = torch.ones_like(out_v) * (rank + 1)
    ((out * probe).sum() + (out_v * probe_v).sum()).backward()

    x2, xv2 = x.detach().clone().requires_grad_(), xv.detach().clone().requires_grad_()
    sync_v, sync_received = comm.all_to_all_v(xv2, ins)
    ((comm.all_to_all(x2) * probe).sum() + (sync_v * probe_v).sum()).backward()
    assert received == sync_received
    assert_same_bytes(out.detach(), comm.all_to_all(x.detach()), "async output")
    assert_same_bytes(x.grad, x2.grad, "grad")
    assert_same_bytes(xv.grad, xv2.grad, "grad v")
    with torch.no_grad():
        assert not comm.all_to_all(x, async_op=True).wait().requires_grad


def test_async_results_are_differentiable(worlds):
    worlds.run(4, _autograd_through_handles)


def _coordinated_async() -> None:
    groups = alltoall.ParallelGroups(tp=2, ep=2, local_size=2)
    ep, tp = groups.ep, groups.tp
    # Replicated across each TP group: seeded by the EP coordinate.
    x = rank_input(groups.ep_rank, 4 * ep * tp, (3,), torch.float64, seed=5).requires_grad_()
    sizes = [5, 2] if groups.ep_rank == 0 else [0, 3]
    xv = rank_input(groups.ep_rank, sum(sizes), (3,), torch.float64, seed=6).requires_grad_()
    peers = [[5, 2], [0, 3]]
    outs = [peers[s][groups.ep_rank] for s in range(ep)]

    there = groups.coordinated_all_to_all(x, async_op=True)
    there_v = groups.coordinated_all_to_all_v(xv, sizes, outs, async_op=True)
    a, av = there.wait(), there_v.wait()
    back = groups.coordinated_all_to_all_back(a * 2, async_op=True)
    back_v = groups.coordinated_all_to_all_back_v(av * 3, [int(n) for n in _chunk_sizes(groups, outs)], sizes,
                                                  async_op=True)
    b, bv = back_v.wait(), back.wait()  # out of order
    (b.sum() + bv.sum()).backward()

    x2, xv2 = x.detach().clone().requires_grad_(), xv.detach().clone().requires_grad_()
    a2 = groups.coordinated_all_to_all(x2)
    av2 = groups.coordinated_all_to_all_v(xv2, sizes, outs)
    b2 = groups.coordinated_all_to_all_back(a2 * 2)
    bv2 = groups.coordinated_all_to_all_back_v(av2 * 3, [int(n) for n in _chunk_sizes(groups, outs)], sizes)
    (b2.sum() + bv2.sum()).backward()
    for got, want, what in ((a, a2, "dispatch"), (av, av2, "dispatch v"), (b, bv2, "combine v"),
                            (bv, b2, "combine"), (x.grad, x2.grad, "grad"), (xv.grad, xv2.grad, "grad v")):
        assert_same_bytes(got.detach(), want.detach(), what)
    torch.testing.assert_close(bv.detach(), x.detach() * 2)  # the round trip


def _chunk_sizes(groups: alltoall.ParallelGroups, outs: list[int]) -> list[int]:
    from alltoall.ops.coordinated import Chunking

    return Chunking(tuple(outs), groups.tp).sizes(groups.tp_rank)


def test_coordinated_exchange_async(worlds):
    worlds.run(4, _coordinated_async)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _dropped_handles() -> tuple[int, int, bool]:
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    x = rank_input(rank, 4 * world, (8,), torch.float32)
    comm.all_to_all(x, "hierarchical")  # subgroups and transports exist; no progress thread yet
    before = _threads()
    assert not comm.progress.started
    for _ in range(3):
        comm.all_to_all(x, "hierarchical", async_op=True)  # dropped at once
    comm.all_to_all_v(x, [4] * world, None, async_op=True)
    started = comm.progress.started
    del comm
    gc.collect()
    return before, _threads(), started


def test_dropping_handles_neither_hangs_nor_leaks(worlds):
    # Shared memory left behind fails every test (conftest).
    for before, after, started in worlds.run(4, _dropped_handles, deadline_s=120):
        assert started
        assert after <= before, f"{after - before} threads left behind"


# A rank killed while an exchange is in flight ----------------------------------

TIMEOUT_S = 20.0


def _doomed_rank(rank: int, world: int, store: str, transport: str, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    comm = alltoall.Communicator(timeout=TIMEOUT_S, transport=transport)
    x = torch.randn(64 * world, 16)
    comm.all_to_all(x)  # everyone is connected
    dist.barrier()
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    work = comm.all_to_all(x, async_op=True)
    start = time.monotonic()
    try:
        work.wait()
        results.put((rank, None, time.monotonic() - start))
    except RuntimeError as error:
        results.put((rank, str(error), time.monotonic() - start))
    results.close()
    results.join_thread()  # the queue's feeder thread must flush before _exit
    os._exit(0)  # the group cannot be torn down cleanly with a dead member


@pytest.mark.parametrize("transport", ["auto", "c10d"])
def test_killed_peer_makes_wait_raise_within_the_timeout(transport):
    world = 3
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_doomed_rank, args=(r, world, f"{tmp}/store", transport, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            got = [results.get(timeout=TIMEOUT_S + 60) for _ in range(world - 1)]
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    assert procs[-1].exitcode == -signal.SIGKILL
    for rank, error, elapsed in got:
        assert error is not None, f"rank {rank}: wait() returned although rank {world - 1} was killed"
        assert elapsed < TIMEOUT_S + 5, f"rank {rank} raised after {elapsed:.1f} s"
