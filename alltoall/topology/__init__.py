"""Layer 1: topology (which node every rank is on) and communication groups."""

from alltoall.topology.layout import RankLayout
from alltoall.topology.topology import Topology

__all__ = ["RankLayout", "Topology"]
