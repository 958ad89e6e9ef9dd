"""Loads the C++ extension. Importing torch first registers the tensor type
casters and the c10d process-group registry the extension relies on."""

from __future__ import annotations

import torch  # noqa: F401  (must precede the extension)

from alltoall import _C

__all__ = ["_C"]
