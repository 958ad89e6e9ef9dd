"""Layer 1: topology (which node every rank is on) and communication groups."""

from alltoall.topology.hosts import detect_hosts, host_identity, host_name
from alltoall.topology.layout import RankLayout
from alltoall.topology.topology import Topology

__all__ = ["RankLayout", "Topology", "detect_hosts", "host_identity", "host_name"]
