"""Topology from node ids: any placement, unequal nodes, emulation."""

from __future__ import annotations

import pytest

from alltoall import Topology


def test_consecutive_hosts():
    topo = Topology.from_node_ids(["a", "a", "b", "b"], rank=3)
    assert topo.size == 4 and topo.num_nodes == 2 and topo.ranks_per_node == 2
    assert topo.node == 1 and topo.local_rank == 1 and topo.local_size == 2
    assert topo.consecutive and topo.uniform
    assert topo.hostnames == ("a", "a", "b", "b")


def test_cyclic_placement():
    # Slurm --distribution=cyclic: rank r on node r % 2.
    topo = Topology.from_node_ids(["n0", "n1", "n0", "n1", "n0", "n1"], rank=3)
    assert topo.node_of_rank == (0, 1, 0, 1, 0, 1)
    assert topo.ranks_of_node(1) == (1, 3, 5)
    assert topo.local_rank == 1
    assert topo.ranks_with_local_rank(2) == (4, 5)
    assert not topo.consecutive and topo.uniform
    assert "interleaved" in topo.describe()


def test_nodes_numbered_by_first_appearance():
    topo = Topology.from_node_ids(["z", "y", "z", "x"], rank=0)
    assert topo.node_of_rank == (0, 1, 0, 2)


def test_unequal_nodes_are_detected_and_reported():
    topo = Topology.from_node_ids(["a", "a", "a", "b"], rank=0)
    assert not topo.uniform
    assert topo.ranks_per_node is None
    assert topo.node_sizes == (3, 1)
    assert "unequal sizes [3, 1]" in topo.describe()


def test_emulated_nodes():
    topo = Topology.emulate(8, 4, rank=5)
    assert topo.emulated and topo.node == 1 and topo.local_rank == 1 and topo.ranks_per_node == 4


@pytest.mark.parametrize("local_size", [0, 3, 16])
def test_emulation_needs_a_divisor(local_size):
    with pytest.raises(ValueError, match=f"local_size={local_size}"):
        Topology.emulate(8, local_size, rank=0)


def test_rank_must_be_in_the_group():
    with pytest.raises(ValueError, match="rank=4"):
        Topology((0, 0, 1, 1), rank=4)
