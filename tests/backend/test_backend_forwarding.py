"""Every collective but all-to-all goes through the alltoall backend to its
inner gloo unchanged: one walk over torch.distributed's API on an alltoall
group, each result compared with the same call on the pool's gloo group."""

from __future__ import annotations

import torch
import torch.distributed as dist

import alltoall
from tests.harness.checks import assert_same_bytes, rank_input


def _both(call, make):
    """``call(tensors, group)`` on the gloo world and on ``group``, on fresh
    copies of ``make()``; returns the two results."""
    results = []
    for g in (None, _both.group):
        tensors = make()
        call(tensors, g)
        results.append(tensors)
    return results


def _walk() -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="alltoall")
    _both.group = group
    x = rank_input(rank, 4, (3,), torch.float32, 1)
    checked = []

    def check(name, call, make):
        reference, ours = _both(call, make)
        for i, (a, b) in enumerate(zip(reference, ours, strict=True)):
            if isinstance(a, list):
                for j, (aa, bb) in enumerate(zip(a, b, strict=True)):
                    assert_same_bytes(bb, aa, f"{name}[{i}][{j}]")
            else:
                assert_same_bytes(b, a, f"{name}[{i}]")
        checked.append(name)

    check("all_reduce", lambda t, g: dist.all_reduce(t[0], group=g), lambda: [x.clone()])
    check("all_reduce max", lambda t, g: dist.all_reduce(t[0], op=dist.ReduceOp.MAX, group=g), lambda: [x.clone()])
    check("broadcast", lambda t, g: dist.broadcast(t[0], src=1, group=g), lambda: [x.clone()])
    check("reduce", lambda t, g: dist.reduce(t[0], dst=2, group=g), lambda: [x.clone()])
    check("all_gather", lambda t, g: dist.all_gather(t[1], t[0], group=g),
          lambda: [x.clone(), [torch.empty_like(x) for _ in range(p)]])
    check("all_gather_into_tensor", lambda t, g: dist.all_gather_into_tensor(t[1], t[0], group=g),
          lambda: [x.clone(), x.new_empty((4 * p, 3))])
    check("gather", lambda t, g: dist.gather(t[0], t[1] if rank == 0 else None, dst=0, group=g),
          lambda: [x.clone(), [torch.zeros_like(x) for _ in range(p)]])
    check("scatter", lambda t, g: dist.scatter(t[0], [c.clone() for c in t[1]] if rank == 3 else None, src=3, group=g),
          lambda: [torch.empty_like(x), [x + d for d in range(p)]])
    check("reduce_scatter_tensor", lambda t, g: dist.reduce_scatter_tensor(t[0], t[1], group=g),
          lambda: [x.new_empty((1, 3)), rank_input(rank, p, (3,), torch.float32, 2)])
    check("all_to_all_single", lambda t, g: dist.all_to_all_single(t[0], t[1], group=g),
          lambda: [torch.empty_like(x), x.clone()])

    def ring(t, g):
        # send/recv around the ring: even ranks send first, odd ranks receive first
        dst, src = (rank + 1) % p, (rank - 1) % p
        if rank % 2 == 0:
            dist.send(t[0], dst=dst, group=g)
            dist.recv(t[1], src=src, group=g)
        else:
            dist.recv(t[1], src=src, group=g)
            dist.send(t[0], dst=dst, group=g)

    check("send/recv", ring, lambda: [x.clone(), torch.empty_like(x)])

    def batched(t, g):
        dst, src = (rank + 1) % p, (rank - 1) % p
        ops = [dist.P2POp(dist.isend, t[0], dst, group=g), dist.P2POp(dist.irecv, t[1], src, group=g)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    check("batch_isend_irecv", batched, lambda: [x.clone(), torch.empty_like(x)])

    def async_reduce(t, g):
        work = dist.all_reduce(t[0], group=g, async_op=True)
        work.wait()

    check("all_reduce async_op", async_reduce, lambda: [x.clone()])

    dist.barrier(group=group)
    objects: list[object] = [None] * p
    dist.all_gather_object(objects, {"rank": rank}, group=group)
    assert objects == [{"rank": r} for r in range(p)]
    box: list[object] = [f"from {rank}"]
    dist.broadcast_object_list(box, src=2, group=group)
    assert box == ["from 2"]
    checked += ["barrier", "all_gather_object", "broadcast_object_list"]
    assert dist.get_backend(group) == "alltoall"
    return {"checked": checked, "stats": alltoall.backend_stats(group)}


def test_every_collective_is_forwarded(world_pools):
    results = world_pools.run(4, _walk)
    for result in results:
        assert len(result["checked"]) == 16
        stats = result["stats"]
        # Only all_to_all_single ran our plans; everything else was forwarded.
        assert stats["algorithms"]["flat"]["calls"] == 1
        assert stats["forwarded"] >= 16


def _not_alltoall() -> str:
    try:
        alltoall.backend_stats(dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return "no error"


def test_stats_of_a_gloo_group_is_an_error(world_pools):
    for message in world_pools.run(2, _not_alltoall):
        assert "uses backend 'gloo', not 'alltoall'" in message
