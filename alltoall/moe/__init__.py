"""Layer 5: the reference MoE layer and its token-to-expert kernels."""

from alltoall.moe.dispatch import Routing, combine, dispatch, route
from alltoall.moe.gate import GateOutput, TopKGate, expert_capacity, load_balancing_loss, router_z_loss
from alltoall.moe.layer import MoE

__all__ = [
    "GateOutput",
    "MoE",
    "Routing",
    "TopKGate",
    "combine",
    "dispatch",
    "expert_capacity",
    "load_balancing_loss",
    "route",
    "router_z_loss",
]
