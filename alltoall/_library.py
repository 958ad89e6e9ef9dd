"""Loads the C++ extension. Importing torch first registers the tensor type
casters and the c10d process-group registry the extension relies on;
torch.distributed registers c10d's Backend class, the base of the
extension's AlltoallBackend."""

from __future__ import annotations

import torch
import torch.distributed  # noqa: F401  (registers c10d.Backend, before the extension)

from alltoall import _C

__all__ = ["_C"]
