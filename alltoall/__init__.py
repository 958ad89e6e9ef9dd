"""alltoall: all-to-all collectives for Mixture-of-Experts expert parallelism.

Layers, bottom up: topology (alltoall.topology), plans (alltoall.plan),
transports (alltoall.transport), collectives with autograd (alltoall.ops) and the
"alltoall" torch.distributed backend (alltoall.backend),
and on top the MoE layer (alltoall.moe) and the tools (alltoall.cli).
"""

from alltoall._library import _C  # noqa: F401
from alltoall.backend import backend_stats
from alltoall.backend import register as _register_backend
from alltoall.moe import MoE
from alltoall.ops import Communicator, DispatchHandle, ExpertDispatcher, ParallelGroups, all_to_all, all_to_all_v
from alltoall.plan import plan
from alltoall.topology import RankLayout, Topology

__version__ = "0.1.0"

# torch.distributed's "alltoall" backend (alltoall.backend).
_register_backend()

__all__ = [
    "Communicator",
    "DispatchHandle",
    "ExpertDispatcher",
    "MoE",
    "ParallelGroups",
    "RankLayout",
    "Topology",
    "__version__",
    "all_to_all",
    "all_to_all_v",
    "backend_stats",
    "plan",
]
