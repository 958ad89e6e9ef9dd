"""Dropping a Communicator after destroy_process_group: its exchangers then
hold the last references to the groups, and deleting them must not deadlock
with gloo's worker threads (which need the GIL to free Python tensors).
Found on the emulated cluster, where a bench rank hung at exit."""

from __future__ import annotations

import gc
from datetime import timedelta

import torch
import torch.distributed as dist

import alltoall


def _drop_communicator_after_destroy(store_dir: str, iterations: int) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    for it in range(iterations):
        if it:  # the pool initialised the first group
            dist.init_process_group("gloo", store=dist.FileStore(f"{store_dir}/store-{it}", world), rank=rank,
                                    world_size=world, timeout=timedelta(seconds=30))
        comm = alltoall.Communicator(local_size=2)
        x = torch.randn(16 * world)
        for _ in range(3):
            comm.all_to_all(x, "hierarchical")
            dist.all_reduce(torch.ones(1))  # a work whose tensors Python created
        dist.destroy_process_group()
        del comm
        gc.collect()
    return iterations


def test_dropping_a_communicator_after_destroying_its_group_does_not_hang(worlds, tmp_path):
    assert worlds.run(4, _drop_communicator_after_destroy, str(tmp_path), 8, deadline_s=120) == [8] * 4
