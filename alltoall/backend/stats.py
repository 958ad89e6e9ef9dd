"""Per-group counters of the "alltoall" backend, readable from Python."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from alltoall._library import _C
from alltoall.backend.settings import BACKEND_NAME, DEVICES


def find_backend(group: dist.ProcessGroup) -> _C.AlltoallBackend | None:
    """The alltoall backend serving ``group``, or None if it uses another."""
    for device in DEVICES:
        try:
            backend = group._get_backend(torch.device(device))
        except RuntimeError:
            continue
        if isinstance(backend, _C.AlltoallBackend):
            return backend
    return None


def backend_stats(group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """What the alltoall backend of ``group`` (default: the world) has run on
    this rank since the group was created.

    Returns:
        ``{"group": name, "algorithms": {alg: {"calls", "bytes", "phases":
        [{"device", "role", "transport", "calls", "bytes"}]}}, "transports":
        {kind: {"calls", "bytes"}}, "forwarded": n}``. An algorithm's bytes
        are its callers' input bytes; a phase's and a transport's are the
        bytes this rank sent to other ranks through it (count exchanges of
        uneven calls without output splits are not counted). ``forwarded``
        counts collectives handed unchanged to the inner backend.

    Raises:
        ValueError: when ``group`` does not use the alltoall backend.
    """
    group = group if group is not None else dist.group.WORLD
    if group is None:
        raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
    backend = find_backend(group)
    if backend is None:
        raise ValueError(f"group '{group.group_name}' uses backend {dist.get_backend(group)!r}, not "
                         f"{BACKEND_NAME!r}: create it with init_process_group({BACKEND_NAME!r}) or "
                         f"new_group(..., backend={BACKEND_NAME!r})")
    return {"group": group.group_name, **backend.stats()}
