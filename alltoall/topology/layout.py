"""Which ranks form the tensor-, expert- and data-parallel groups.

Pure arithmetic, no communication: ``ParallelGroups`` (alltoall.ops) creates
the process groups this layout describes.

The world is ``tp x ep x dp`` ranks. A rank's coordinates (t, e, d) are its
tensor-parallel rank, its expert-parallel rank and its expert-data-parallel
replica. ``order`` names the dimensions from fastest- to slowest-varying:
with the default "tp-ep-dp", logical rank ``t + tp*(e + ep*d)``.

Logical ranks are mapped onto ranks node by node (node-major, local rank
order), so that consecutive logical ranks share a node whatever the
placement: TP groups then stay inside nodes on interleaved (cyclic)
placements too. On the usual consecutive placement the map is the identity.

Groups (each a list of global ranks, ascending):

- tp:  same (e, d), the ranks that split a layer's tensors;
- ep:  same (t, d), the ranks that hold different experts and exchange tokens;
- edp: same (t, e), replicas of the same experts (gradient all-reduce);
- dp:  same t, the data-parallel group of the dense (non-expert) weights;
- node: the ranks of one node; rail: the ranks with one local rank, one per node.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from alltoall.topology.topology import Topology

DIMENSIONS = ("tp", "ep", "dp")
KINDS = ("tp", "ep", "edp", "dp", "node", "rail")


@dataclass(frozen=True)
class RankLayout:
    """The rank layout of ``tp x ep x dp`` ranks on ``topology``.

    Raises ValueError naming the sizes when tp does not divide the world,
    ep does not divide world/tp or num_experts, or, with tp_inside_node,
    a TP group would span nodes.
    """

    topology: Topology
    tp: int = 1
    ep: int | None = None
    order: str = "tp-ep-dp"
    tp_inside_node: bool = True
    num_experts: int | None = None

    def __post_init__(self) -> None:
        world = self.topology.size
        if self.tp < 1 or world % self.tp:
            raise ValueError(f"tp={self.tp} must be >= 1 and divide the world size {world}")
        ep = world // self.tp if self.ep is None else self.ep
        if ep < 1 or (world // self.tp) % ep:
            raise ValueError(f"ep={ep} must be >= 1 and divide world_size/tp = {world}/{self.tp} = {world // self.tp}")
        object.__setattr__(self, "ep", ep)
        if self.num_experts is not None and (self.num_experts < 1 or self.num_experts % ep):
            raise ValueError(f"ep={ep} must divide num_experts={self.num_experts}")
        dims = self.order.split("-")
        if sorted(dims) != sorted(DIMENSIONS):
            raise ValueError(f"order={self.order!r} must name each of tp, ep, dp once, e.g. 'tp-ep-dp'")
        if self.tp_inside_node:
            for members in self.groups("tp"):
                nodes = {self.topology.node_of_rank[r] for r in members}
                if len(nodes) > 1:
                    sizes = sorted(set(self.topology.node_sizes))
                    raise ValueError(
                        f"tp={self.tp} with order={self.order!r} puts TP group {members} on {len(nodes)} nodes "
                        f"(nodes hold {sizes} ranks); choose tp dividing the node size, or pass "
                        f"tp_inside_node=False to let TP groups span nodes"
                    )

    @property
    def dp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert."""
        return self.topology.size // (self.tp * self.ep)

    @property
    def world_size(self) -> int:
        return self.topology.size

    @cached_property
    def _physical(self) -> tuple[int, ...]:
        """Logical rank -> rank: node by node, in local-rank order."""
        return tuple(r for n in range(self.topology.num_nodes) for r in self.topology.ranks_of_node(n))

    @cached_property
    def _logical(self) -> tuple[int, ...]:
        logical = [0] * self.world_size
        for i, r in enumerate(self._physical):
            logical[r] = i
        return tuple(logical)

    def _sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "ep": self.ep, "dp": self.dp}

    def coordinates(self, rank: int) -> dict[str, int]:
        """{'tp': t, 'ep': e, 'dp': d} of a rank."""
        index = self._logical[rank]
        coords = {}
        for dim in self.order.split("-"):
            size = self._sizes()[dim]
            coords[dim] = index % size
            index //= size
        return coords

    def _rank_at(self, coords: dict[str, int]) -> int:
        index, stride = 0, 1
        for dim in self.order.split("-"):
            index += coords[dim] * stride
            stride *= self._sizes()[dim]
        return self._physical[index]

    def _vary(self, free: tuple[str, ...]) -> list[list[int]]:
        """Groups of ranks that share every coordinate except those in ``free``."""
        groups: dict[tuple[int, ...], list[int]] = {}
        fixed = [d for d in DIMENSIONS if d not in free]
        for r in range(self.world_size):
            c = self.coordinates(r)
            groups.setdefault(tuple(c[d] for d in fixed), []).append(r)
        return sorted(sorted(g) for g in groups.values())

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind, as ascending global ranks, sorted."""
        if kind == "tp":
            return self._vary(("tp",))
        if kind == "ep":
            return self._vary(("ep",))
        if kind == "edp":
            return self._vary(("dp",))
        if kind == "dp":
            return self._vary(("ep", "dp"))
        if kind == "node":
            return [list(self.topology.ranks_of_node(n)) for n in range(self.topology.num_nodes)]
        if kind == "rail":
            if not self.topology.uniform:
                return []
            return [list(self.topology.ranks_with_local_rank(lr)) for lr in range(self.topology.ranks_per_node)]
        raise ValueError(f"unknown group kind {kind!r}; expected one of {', '.join(KINDS)}")

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The group of one kind that holds ``rank``."""
        for members in self.groups(kind):
            if rank in members:
                return members
        raise ValueError(f"rank {rank} is in no {kind} group (nodes of unequal size have no rails)")

    def table(self) -> str:
        """A markdown table of every group, for the docs and for logs."""
        rows = ["| Kind | Groups |", "|---|---|"]
        for kind in KINDS:
            groups = self.groups(kind)
            rows.append(f"| {kind} | {' '.join(str(g).replace(' ', '') for g in groups)} |")
        return "\n".join(rows)
