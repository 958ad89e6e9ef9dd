"""Layer 4: the collectives, with autograd, over the C++ executor."""

from alltoall.ops.communicator import Communicator
from alltoall.ops.functional import all_to_all, all_to_all_v

__all__ = ["Communicator", "all_to_all", "all_to_all_v"]
