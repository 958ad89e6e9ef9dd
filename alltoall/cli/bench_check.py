"""Verifiable data for alltoall-bench, as nccl-tests does it.

Element ``i`` of source rank ``s``'s send buffer is a hash of (seed, s, i).
A receiver knows the traffic matrix, so it regenerates exactly what each
source sent it and counts mismatches locally; nothing is gathered. Values
are chosen to be exact in every dtype, so comparison is exact.
"""

from __future__ import annotations

import os

import torch

CORRUPT_ENV = "ALLTOALL_BENCH_CORRUPT"

_MASK32 = 0xFFFFFFFF


def element_hash(seed: int, source: torch.Tensor | int, index: torch.Tensor) -> torch.Tensor:
    """A 32-bit mix of (seed, source, index), as int64 in [0, 2**32).

    int64 arithmetic only, with every product below 2**62, so CPU and CUDA
    give the same bits.
    """
    x = (index + source * 0x85EBCA77 + (seed & _MASK32) * 0x9E3779B1) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _MASK32
    return x ^ (x >> 16)


def hash_to_dtype(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values every dtype holds exactly (integers within its mantissa), so a
    round trip through any exchange compares bit for bit."""
    if dtype in (torch.float32, torch.float64):
        return (h & 0xFFFFFF).to(dtype)
    if dtype == torch.float16:
        return (h & 0x7FF).to(dtype)
    if dtype == torch.bfloat16:
        return (h & 0xFF).to(dtype)
    if dtype == torch.int8:
        return ((h & 0xFF) - 128).to(dtype)
    if dtype == torch.uint8:
        return (h & 0xFF).to(dtype)
    if dtype == torch.int32:
        return (h - (1 << 31)).to(dtype)
    if dtype == torch.int64:
        return h * 0x10001 - (1 << 47)
    raise ValueError(f"no hashed values defined for dtype {dtype}")


def make_input(seed: int, rank: int, elements: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This rank's send buffer: ``[elements]``, element i = hash(seed, rank, i)."""
    index = torch.arange(elements, dtype=torch.int64, device=device)
    return hash_to_dtype(element_hash(seed, rank, index), dtype)


def expected_output(seed: int, rank: int, matrix: list[list[int]], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """What ``rank`` must receive: ``[sum_s matrix[s][rank]]``, the block of
    each source s in source order, each block the slice of s's send buffer
    that starts after what s sends to ranks below ``rank``."""
    counts = torch.tensor([row[rank] for row in matrix], dtype=torch.int64)
    starts = torch.tensor([sum(row[:rank]) for row in matrix], dtype=torch.int64)
    total = int(counts.sum())
    sources = torch.repeat_interleave(torch.arange(len(matrix)), counts)
    block_begin = torch.cumsum(counts, 0) - counts
    position = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(block_begin, counts)
    index = (position + torch.repeat_interleave(starts, counts)).to(device)
    return hash_to_dtype(element_hash(seed, sources.to(device), index), dtype)


# Source ids of TP-replicated buffers, apart from the ranks' own.
REPLICA_SOURCE = 1 << 20


def expected_coordinated(seed: int, ep_rank: int, tp_rank: int, dp_rank: int, ep: int, tp: int, total: int,
                         dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What rank (ep_rank, tp_rank) of replica dp_rank receives from the
    coordinated dispatch of ``total``-element TP-replicated buffers: from each
    EP source s, chunk tp_rank of the block s's buffer holds for ep_rank."""
    block = total // ep
    chunk = block // tp
    start = ep_rank * block + tp_rank * chunk
    index = torch.arange(start, start + chunk, dtype=torch.int64, device=device)
    parts = [element_hash(seed, REPLICA_SOURCE + s + ep * dp_rank, index) for s in range(ep)]
    return hash_to_dtype(torch.cat(parts), dtype)


def count_wrong(received: torch.Tensor, expected: torch.Tensor) -> int:
    """Elements that differ; a wrong shape counts every expected element
    (and any extra received one) as wrong."""
    received = received.reshape(-1)
    if received.shape != expected.shape or received.dtype != expected.dtype:
        return max(expected.numel(), received.numel())
    return int((received != expected).sum())


def corrupted_algorithm() -> str | None:
    """The algorithm named by ``ALLTOALL_BENCH_CORRUPT``: a test hook that
    proves the check catches a wrong exchange."""
    return os.environ.get(CORRUPT_ENV) or None


def corrupt(received: torch.Tensor) -> torch.Tensor:
    """Changes one element of a copy (values are exact integers in every
    dtype, so +1 always changes the bits)."""
    out = received.clone()
    if out.numel():
        flat = out.view(-1)
        flat[0] = flat[0] + 1
    return out
