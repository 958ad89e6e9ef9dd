"""Devices for tests parametrised by device.

``DEVICES`` runs a test on the CPU always and on CUDA under the ``gpu``
marker; ``gpu(n)`` asks for n devices. tests/conftest.py turns a missing
device into a skip that says why, so ``make test`` lists them as skipped and
``make test-gpu`` (which selects ``-m gpu``) runs them.
"""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def missing_devices(needed: int) -> str | None:
    """Why a test that needs ``needed`` CUDA devices cannot run here, or None."""
    have = cuda_count()
    if have >= needed:
        return None
    if not torch.cuda.is_available():
        built = "a CPU-only torch" if torch.version.cuda is None else f"torch for CUDA {torch.version.cuda}"
        return f"no CUDA device visible ({built}); run make test-gpu on a machine with an NVIDIA GPU"
    return f"needs {needed} CUDA devices, {have} visible"


def extension_has_cuda() -> bool:
    from alltoall._library import _C

    return bool(_C.build_info().get("cuda"))
