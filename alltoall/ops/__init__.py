"""Layer 4: the collectives, with autograd, over the C++ executor."""

from alltoall.ops.communicator import Communicator
from alltoall.ops.expert_dispatcher import DispatchHandle, ExpertDispatcher
from alltoall.ops.functional import all_to_all, all_to_all_v
from alltoall.ops.parallel_groups import ParallelGroups

__all__ = ["Communicator", "DispatchHandle", "ExpertDispatcher", "ParallelGroups", "all_to_all", "all_to_all_v"]
