"""Helpers the rank bodies share: deterministic inputs and exact comparison."""

from __future__ import annotations

import torch


def rank_input(rank: int, rows: int, trailing: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random contents that differ by rank and seed, for any dtype."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    shape = (rows, *trailing)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(dtype)


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """Equal shape, dtype and bits (NaNs included)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
    b = expected.detach().contiguous().reshape(-1).view(torch.uint8)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} bytes differ, first at byte {int(bad[0])}")


def in_step_after_a_value_error(comm, rebuild, probe) -> object:
    """A Communicator to go on with after a rank raised ValueError on ``comm``.

    Over shared memory the raising rank marked its groups failed (issue 24),
    so that peers stop waiting for it: every rank's next call (``probe(comm)``)
    raises, naming that error, and ``rebuild()`` makes a new Communicator.
    Over c10d (gloo has no abort) ``comm`` itself goes on."""
    import pytest
    import torch.distributed as dist

    if any("shm" in comm.transports(name) for name in comm._exchangers):
        with pytest.raises(dist.DistBackendError, match="ValueError"):
            probe(comm)
        return rebuild()
    return comm
