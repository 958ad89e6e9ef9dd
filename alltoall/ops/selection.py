"""The rule behind algorithm="auto".

Hierarchical only pays where intra-node links are faster than inter-node
ones and messages are small enough to be latency-bound (DeepSpeed-MoE,
section 5.3; Tutel's 2DH). On one host, every message costs the same and the
extra copies make it slower, so emulated nodes never pick it.

The default bound, 8 KiB per peer, is where hierarchical stopped winning on
the emulated clusters of docs/performance.md (2x4 and 4x2 hosts, 1 Gbit/s
links, gloo). Real clusters differ: measure with alltoall-bench and set
ALLTOALL_AUTO_MAX_PEER_BYTES.
"""

from __future__ import annotations

import os

from alltoall.topology import Topology

MAX_PEER_BYTES_ENV = "ALLTOALL_AUTO_MAX_PEER_BYTES"
DEFAULT_MAX_PEER_BYTES = 8 * 1024


def max_peer_bytes() -> int:
    raw = os.environ.get(MAX_PEER_BYTES_ENV)
    if not raw:
        return DEFAULT_MAX_PEER_BYTES
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{MAX_PEER_BYTES_ENV}={raw!r} is not an integer") from None


def hierarchy_possible(topology: Topology) -> bool:
    """Real (not emulated) nodes, at least two of them, of equal size > 1."""
    g = topology.ranks_per_node
    return not topology.emulated and topology.num_nodes > 1 and g is not None and g > 1


def hierarchical_up_to(topology: Topology) -> int | None:
    """The bytes per peer up to which equal splits go hierarchical; None when
    they never do on this topology."""
    return max_peer_bytes() if hierarchy_possible(topology) else None


def choose(topology: Topology, bytes_per_peer: int | None) -> str:
    """'hierarchical' or 'flat'. Every rank must reach the same answer, so
    uneven exchanges (whose sizes differ by rank) pass bytes_per_peer=None
    and decide on the topology alone."""
    limit = hierarchical_up_to(topology)
    if limit is None:
        return "flat"
    if bytes_per_peer is None:
        return "hierarchical"
    return "hierarchical" if bytes_per_peer <= limit else "flat"
