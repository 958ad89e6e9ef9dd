"""Layer 4: the "alltoall" torch.distributed backend. Existing code that
calls ``torch.distributed.all_to_all_single`` gets our plans by creating its
groups with the backend name "alltoall" (docs/api.md, "Switching existing
code"); every other collective goes unchanged to the inner backend."""

from alltoall.backend.registration import is_registered, register
from alltoall.backend.settings import BACKEND_NAME
from alltoall.backend.stats import backend_stats

__all__ = ["BACKEND_NAME", "backend_stats", "is_registered", "register"]
