"""Test and benchmark infrastructure shipped with the package: an emulated
multi-host cluster built from Linux network namespaces."""

from alltoall.testing.emulated_cluster import (
    ClusterTimeout,
    EmulatedCluster,
    Host,
    HostResult,
    launcher_free_environment,
    unavailable_reason,
)

__all__ = ["ClusterTimeout", "EmulatedCluster", "Host", "HostResult", "launcher_free_environment",
           "unavailable_reason"]
