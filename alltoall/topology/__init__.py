"""Layer 1: topology (which node every rank is on) and communication groups."""

from alltoall.topology.hosts import detect_hosts, host_identity, host_name
from alltoall.topology.layout import RankLayout
from alltoall.topology.topology import LOCAL_SIZE_ENV, Topology, emulated_local_size

__all__ = ["LOCAL_SIZE_ENV", "RankLayout", "Topology", "detect_hosts", "emulated_local_size", "host_identity",
           "host_name"]
