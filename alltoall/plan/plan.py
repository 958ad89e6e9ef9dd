"""Python view of the C++ exchange plans (layer 2).

A plan is pure data: the phases of an exchange, the group of each phase, the
blocks sent to every peer and the block reorders between phases. Building one
involves no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alltoall._library import _C
from alltoall.plan.model import Prediction, predict_plan
from alltoall.plan.profile import Profile

ALGORITHMS = ("flat", "hierarchical", "coordinated")
PLAN_TRANSPORTS = ("auto", "shm", "c10d")


@dataclass(frozen=True)
class LinkUse:
    """Per-rank traffic on one class of link (intra-node or inter-node).

    ``count_bytes`` is what an uneven exchange (all_to_all_v) sends ahead of
    the data when output splits are not given: one int64 per block, in as
    many extra small messages as ``messages``. It is O(p) per rank.
    """

    messages: int
    bytes: int
    count_bytes: int


@dataclass(frozen=True)
class PlanSummary:
    """What an exchange costs one rank, by link class.

    ``bytes`` counts payload bytes sent to other ranks for a send buffer of
    ``bytes_per_rank`` bytes split equally among the group.
    """

    algorithm: str
    world_size: int
    ranks_per_node: int
    tp: int
    bytes_per_rank: int
    intra_node: LinkUse
    inter_node: LinkUse
    phases: tuple[_C.Phase, ...]
    raw: _C.ExchangePlan
    transports: tuple[str, ...] = ()  # per phase: "shm" or "c10d"

    @property
    def messages(self) -> int:
        """Messages per rank, both link classes."""
        return self.intra_node.messages + self.inter_node.messages

    @property
    def node_of_rank(self) -> tuple[int, ...]:
        return tuple(r // self.ranks_per_node for r in range(self.world_size))

    def predict(self, bytes_per_rank: float, profile: Profile, links: Sequence[str] | None = None) -> Prediction:
        """Predicted time of this rank's exchange of ``bytes_per_rank`` bytes
        on the system ``profile`` describes (see alltoall.plan.model).

        ``links``: each phase's link class; default from the profile (its
        intra-node class for phases inside a node, else its inter-node class).
        """
        return predict_plan(self.raw, self.node_of_rank, bytes_per_rank, profile, links)


def make_plan(
    node_of_rank: Sequence[int],
    rank: int,
    algorithm: str,
    tp: int = 1,
    rank_order: Sequence[int] | None = None,
) -> _C.ExchangePlan:
    """The C++ plan of ``rank`` for a group whose rank r sits on node_of_rank[r].

    ``rank_order`` relabels the group: block i goes to (and output block i
    comes from) group rank rank_order[i].
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    return _C.make_plan(list(node_of_rank), rank, algorithm, tp, list(rank_order or []))


def phase_transports(raw: _C.ExchangePlan, node_of_rank: Sequence[int], transport: str) -> tuple[str, ...]:
    """What carries each phase when nodes are hosts: "auto" puts a phase whose
    group sits on one node in shared memory ("shm") and the others on the
    process group's backend ("c10d"); "shm" raises ValueError for a phase
    that spans nodes; "c10d" is c10d throughout (as a Communicator chooses,
    alltoall.transport.choice)."""
    if transport not in PLAN_TRANSPORTS:
        raise ValueError(f"transport={transport!r} is not one of {', '.join(PLAN_TRANSPORTS)}")
    out = []
    for phase in raw.phases:
        on_one_node = len({node_of_rank[r] for r in phase.group_ranks}) == 1
        if transport == "shm" and not on_one_node:
            raise ValueError(f"transport='shm': the {phase.role} phase of the {raw.algorithm} plan spans nodes")
        out.append("shm" if transport != "c10d" and on_one_node else "c10d")
    return tuple(out)


def plan(
    world_size: int,
    ranks_per_node: int,
    algorithm: str,
    tp: int = 1,
    *,
    bytes_per_rank: int = 1 << 20,
    rank: int = 0,
    transport: str = "auto",
) -> PlanSummary:
    """Plans an all-to-all on ``world_size`` ranks in nodes of ``ranks_per_node``
    consecutive ranks, and summarises one rank's traffic.

    Flat: p-1 messages. Hierarchical: G-1 intra-node and p/G-1 inter-node
    messages, each byte crossing both link classes. Coordinated (tensor
    parallel groups of ``tp`` consecutive ranks, input replicated inside
    them): p/tp-1 all-to-all messages, then tp-1 all-gather messages.
    ``bytes_per_rank`` is then the size of the replicated input.
    ``transport`` decides what each phase would run over, nodes being hosts
    (``PlanSummary.transports``; see ``phase_transports``).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} must be >= 1 and divide world_size={world_size}")
    nodes = [r // ranks_per_node for r in range(world_size)]
    raw = make_plan(nodes, rank, algorithm, tp)
    block_bytes = bytes_per_rank / raw.num_blocks

    def use(link: _C.LinkTraffic) -> LinkUse:
        return LinkUse(messages=link.messages, bytes=round(link.blocks * block_bytes), count_bytes=8 * link.counts)

    return PlanSummary(
        algorithm=algorithm,
        world_size=world_size,
        ranks_per_node=ranks_per_node,
        tp=tp,
        bytes_per_rank=bytes_per_rank,
        intra_node=use(raw.intra_node),
        inter_node=use(raw.inter_node),
        phases=tuple(raw.phases),
        raw=raw,
        transports=phase_transports(raw, nodes, transport),
    )
