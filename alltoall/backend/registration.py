"""Registers the "alltoall" backend with torch.distributed (extended API,
CPU and CUDA tensors). ``import alltoall`` does it; it changes no default:
only groups created with the name "alltoall" use it."""

from __future__ import annotations

import torch.distributed as dist

from alltoall.backend.creation import create_backend
from alltoall.backend.settings import BACKEND_NAME, DEVICES


def is_registered() -> bool:
    plugin = dist.Backend._plugins.get(BACKEND_NAME.upper()) if dist.is_available() else None
    return plugin is not None and plugin.creator_fn is create_backend


def register() -> None:
    """Makes ``init_process_group("alltoall")`` and ``new_group(backend=
    "alltoall")`` build our backend. Idempotent."""
    if dist.is_available() and not is_registered():
        dist.Backend.register_backend(BACKEND_NAME, create_backend, extended_api=True, devices=list(DEVICES))
