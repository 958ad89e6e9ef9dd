"""A stand-in for an expert-parallel Communicator whose exchanges are local
copies: the layer moves the same bytes through memory but none between
ranks. The benchmarks' "local-copy control" (bench/moe_step.py) and the
single-process host-work count (bench/moe_host_work.py) use it to measure a
step without its communication."""

from __future__ import annotations

import torch


class CopiedWork:
    """The finished handle of a local copy (``async_op=True``)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value

    def is_completed(self) -> bool:
        return True


class LocalCopy:
    """EP rank ``rank`` of ``size`` (``group``: the real Communicator's, or
    None): every equal exchange returns a differentiable copy of its input
    ``[rows, ...]``; ``all_to_all_v`` is not covered (capacity mode only)."""

    def __init__(self, size: int, rank: int = 0, group: object = None) -> None:
        self.size, self.rank, self.group = size, rank, group

    def resolve(self, algorithm: str, bytes_per_peer: int | None = None) -> str:
        return algorithm

    def all_to_all(self, x: torch.Tensor, algorithm: str = "auto", *, check: bool | None = None,
                   async_op: bool = False) -> torch.Tensor | CopiedWork:
        out = x.clone()
        return CopiedWork(out) if async_op else out

    def all_to_all_v(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise NotImplementedError("the local-copy stand-in covers capacity mode (equal exchanges) only")
