"""Which node every rank of a process group sits on.

A node is a set of ranks that share a fast interconnect (NVLink, or shared
memory on a CPU host). Nodes are detected from host names, or emulated on
one host by cutting the group into blocks of ``local_size`` consecutive ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist

from alltoall._env import env_int
from alltoall.topology.hosts import host_identity, host_name

LOCAL_SIZE_ENV = "ALLTOALL_LOCAL_SIZE"


def emulated_local_size() -> int | None:
    """``ALLTOALL_LOCAL_SIZE`` as an int, or None when unset."""
    return env_int(LOCAL_SIZE_ENV)


@dataclass(frozen=True)
class Topology:
    """The node layout of a process group, as seen from one of its ranks.

    Ranks are ranks of the group (0 .. size-1), not global ranks. Node ids are
    0 .. num_nodes-1, numbered in the order their first rank appears.

    Attributes:
        node_of_rank: ``node_of_rank[r]`` is the node of group rank ``r``.
        rank: this process's rank in the group.
        hostnames: the host name of every rank when detected, else ``None``.
        emulated: True when nodes come from ``local_size`` rather than hosts.
    """

    node_of_rank: tuple[int, ...]
    rank: int
    hostnames: tuple[str, ...] | None = None
    emulated: bool = False

    def __post_init__(self) -> None:
        if not self.node_of_rank:
            raise ValueError("a topology needs at least one rank; node_of_rank is empty")
        if not 0 <= self.rank < len(self.node_of_rank):
            raise ValueError(f"rank={self.rank} is outside a group of size {len(self.node_of_rank)}")
        seen = sorted(set(self.node_of_rank))
        if seen != list(range(len(seen))):
            raise ValueError(f"node ids must be 0..N-1 with none unused, got {sorted(set(self.node_of_rank))}")

    # Construction -----------------------------------------------------------

    @classmethod
    def from_node_ids(cls, node_ids: Sequence[object], rank: int, *, emulated: bool = False) -> Topology:
        """Numbers nodes by first appearance: any hashable ids (host names, ints)."""
        numbering: dict[object, int] = {}
        node_of_rank = tuple(numbering.setdefault(node, len(numbering)) for node in node_ids)
        hostnames = tuple(str(n) for n in node_ids) if all(isinstance(n, str) for n in node_ids) else None
        return cls(node_of_rank, rank, hostnames, emulated)

    @classmethod
    def emulate(cls, size: int, local_size: int, rank: int) -> Topology:
        """Nodes of ``local_size`` consecutive ranks, as if on separate hosts."""
        if local_size < 1 or size % local_size != 0:
            raise ValueError(f"local_size={local_size} must be >= 1 and divide the group size {size}")
        return cls(tuple(r // local_size for r in range(size)), rank, None, True)

    @classmethod
    def detect(cls, group: dist.ProcessGroup | None = None, *, local_size: int | None = None) -> Topology:
        """Detects the topology of ``group``; collective over the group.

        ``local_size`` (or the ``ALLTOALL_LOCAL_SIZE`` environment variable)
        emulates nodes of that many consecutive ranks. Otherwise every rank
        sends its host name (``ALLTOALL_HOSTNAME`` overrides it) and ranks
        with the same name share a node, in whatever order they sit.
        """
        size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if local_size is None:
            local_size = emulated_local_size()
        if local_size is not None:
            return cls.emulate(size, local_size, rank)
        names: list[object] = [None] * size
        dist.all_gather_object(names, host_name(host_identity()), group=group)
        return cls.from_node_ids(names, rank)

    # Queries ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    @property
    def node_sizes(self) -> tuple[int, ...]:
        return tuple(len(m) for m in self._members)

    @property
    def uniform(self) -> bool:
        """True when every node holds the same number of ranks."""
        return len(set(self.node_sizes)) == 1

    @property
    def ranks_per_node(self) -> int | None:
        """G, the ranks per node, or None when nodes differ in size."""
        return self.node_sizes[0] if self.uniform else None

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.node_of_rank[self.rank]

    @cached_property
    def _members(self) -> tuple[tuple[int, ...], ...]:
        members: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for r, n in enumerate(self.node_of_rank):
            members[n].append(r)
        return tuple(tuple(m) for m in members)

    @cached_property
    def _local_ranks(self) -> tuple[int, ...]:
        local = [0] * self.size
        for members in self._members:
            for i, r in enumerate(members):
                local[r] = i
        return tuple(local)

    def ranks_of_node(self, node: int) -> tuple[int, ...]:
        """Ascending group ranks on ``node``."""
        return self._members[node]

    def local_rank_of(self, rank: int) -> int:
        """Position of ``rank`` among the ascending ranks of its node."""
        return self._local_ranks[rank]

    def ranks_with_local_rank(self, local_rank: int) -> tuple[int, ...]:
        """Ascending ranks holding ``local_rank`` on their node: one per node
        when nodes are of equal size (a "rail")."""
        return tuple(r for r, lr in enumerate(self._local_ranks) if lr == local_rank)

    @property
    def local_rank(self) -> int:
        return self.local_rank_of(self.rank)

    @property
    def local_size(self) -> int:
        """Ranks on this rank's node."""
        return self.node_sizes[self.node]

    @property
    def consecutive(self) -> bool:
        """True when every node holds a block of consecutive ranks."""
        return all(a <= b for a, b in zip(self.node_of_rank, self.node_of_rank[1:], strict=False))

    def describe(self) -> str:
        """One line for logs and headers."""
        if self.uniform:
            shape = f"{self.num_nodes} node(s) x {self.ranks_per_node} rank(s)"
        else:
            shape = f"{self.num_nodes} node(s) of unequal sizes {list(self.node_sizes)}"
        kind = "emulated" if self.emulated else ("consecutive" if self.consecutive else "interleaved")
        return f"{self.size} ranks on {shape}, {kind} placement"
