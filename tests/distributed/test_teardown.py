"""Releasing a Communicator after destroy_process_group: its transports then
hold the last reference to the process group, whose destructor joins gloo's
worker threads, which may need the GIL to free Python-owned tensors of
finished work. The release must not hold the GIL (it used to deadlock)."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist

import alltoall


def _release_after_destroy(calls: int) -> bool:
    comm = alltoall.Communicator()
    x = torch.randn(8 * dist.get_world_size())
    for _ in range(calls):
        comm.all_to_all(x, "flat")
        dist.all_to_all_single(torch.empty_like(x), x)  # work that owns Python tensors
    dist.destroy_process_group()
    del comm
    gc.collect()
    return True


def test_release_after_destroy_process_group_does_not_hang(worlds):
    # A race with gloo's worker threads: without the fix, one of three runs
    # hung every time we tried (8 ranks on 2 cores).
    for _ in range(3):
        assert worlds.run(8, _release_after_destroy, 300, deadline_s=60) == [True] * 8
