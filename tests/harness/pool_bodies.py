"""Module-level bodies for the pool's own tests (rank processes import them)."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank_and_pid() -> tuple[int, int]:
    return dist.get_rank(), os.getpid()
