"""Exchanges with tensors on a device, against dist.all_to_all_single on the
same group: every algorithm, equal and uneven splits, forward and backward.

The same body runs on the CPU (gloo), with CUDA tensors over gloo on 2 and 4
processes that share one GPU (gloo stages CUDA tensors through host memory),
and with CUDA tensors over NCCL, one GPU per rank (needs 2 or more GPUs)."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import alltoall
from tests.harness.checks import assert_same_bytes, rank_input
from tests.harness.devices import cuda_count

ALGORITHMS = ("flat", "hierarchical", "auto")


def nccl_world(store_dir: str, bound: bool) -> torch.device:
    """Replaces the pool's gloo group by an NCCL one, a GPU per rank; with
    ``bound``, created with device_id= (eager NCCL: subgroups are splits)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.FileStore(os.path.join(store_dir, "nccl-store"), world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=60), device_id=device if bound else None)
    return device


def split_matrix(p: int) -> list[list[int]]:
    """Rows sent from s to d: uneven, with zeros."""
    return [[(3 * s + 5 * d) % 4 for d in range(p)] for s in range(p)]


def exchange_everything(device: torch.device, local_size: int) -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = rank_input(rank, 3 * p, (5,), dtype).to(device)
        expected = torch.empty_like(x)
        dist.all_to_all_single(expected, x)
        for algorithm in ALGORITHMS:
            got = comm.all_to_all(x, algorithm)
            assert got.device == device
            assert_same_bytes(got.cpu(), expected.cpu(), f"{algorithm} {dtype} on {device}")
            if dtype == torch.float32:
                xg = x.clone().requires_grad_()
                probe = rank_input(rank, 3 * p, (5,), dtype, seed=2).to(device)
                comm.all_to_all(xg, algorithm).backward(probe)
                want_grad = torch.empty_like(probe)
                dist.all_to_all_single(want_grad, probe)
                assert_same_bytes(xg.grad.cpu(), want_grad.cpu(), f"{algorithm} backward on {device}")
            checked += 1
    m = split_matrix(p)
    ins, outs = m[rank], [m[s][rank] for s in range(p)]
    for algorithm in ("flat", "hierarchical"):
        x = rank_input(rank, sum(ins), (3,), torch.float32).to(device).requires_grad_()
        probe = rank_input(rank, sum(outs), (3,), torch.float32, seed=1).to(device)
        expected = torch.empty(sum(outs), 3, device=device)
        dist.all_to_all_single(expected, x.detach(), outs, ins)
        y = comm.all_to_all_v(x, ins, outs, algorithm)
        assert_same_bytes(y.detach().cpu(), expected.cpu(), f"{algorithm} v on {device}")
        y.backward(probe)
        want_grad = torch.empty_like(x)
        dist.all_to_all_single(want_grad, probe, ins, outs)
        assert_same_bytes(x.grad.cpu(), want_grad.cpu(), f"{algorithm} v backward on {device}")
        checked += 1
    return checked


def _on_gloo(device_name: str, local_size: int) -> int:
    return exchange_everything(torch.device(device_name), local_size)


def _on_nccl(store_dir: str, local_size: int) -> int:
    return exchange_everything(nccl_world(store_dir, bound=False), local_size)


@pytest.mark.parametrize("world,local_size", [(2, 1), (4, 2)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_exchanges_over_gloo(worlds, device, world, local_size):
    # With CUDA, every rank uses the same GPU: one GPU is enough.
    assert worlds.run(world, _on_gloo, device, local_size, deadline_s=300) == [11] * world


@pytest.mark.gpu(2)
def test_exchanges_over_nccl(worlds, tmp_path):
    world = min(4, cuda_count())
    local_size = 2 if world == 4 else 1
    assert worlds.run(world, _on_nccl, str(tmp_path), local_size, deadline_s=300) == [11] * world


def _host_returns_before_the_gpu(store_dir: str) -> float:
    device = nccl_world(store_dir, bound=False)
    p = dist.get_world_size()
    comm = alltoall.Communicator(local_size=1)
    x = torch.randn(64 * p, 256, device=device)
    for algorithm in ("flat", "hierarchical"):
        comm.all_to_all(x, algorithm)  # communicators are created on first use
    torch.cuda.synchronize()
    worst = 0.0
    for algorithm in ("flat", "hierarchical"):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time on this stream
        start = time.perf_counter()
        y = comm.all_to_all(x, algorithm)
        worst = max(worst, time.perf_counter() - start)
        torch.cuda.synchronize()
        expected = torch.empty_like(x)
        dist.all_to_all_single(expected, x)
        assert torch.equal(y, expected)
    return worst


@pytest.mark.gpu(2)
def test_an_nccl_exchange_does_not_wait_on_the_host(worlds, tmp_path):
    # Review finding A1: a bounded host wait made every call drain the GPU
    # queue. Queued behind a second of GPU sleep, the call must return at
    # once; 0.2 s leaves room for a slow host and none for the sleep.
    world = min(4, cuda_count())
    host_seconds = worlds.run(world, _host_returns_before_the_gpu, str(tmp_path), deadline_s=240)
    assert max(host_seconds) < 0.2, f"exchange calls took {host_seconds} s on the host"
