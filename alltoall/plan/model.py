"""The cost model: predicted time of a plan for a size and a profile (layer 2).

Every phase costs its link class's ``phase_us`` (one collective call on
its transport), each of its messages alpha and each byte 1/bandwidth of
the class, at the bandwidth of the protocol its message size selects (the
shared-memory transport reads messages of at least
``ALLTOALL_SHM_SINGLE_COPY_BYTES`` straight from the sender; smaller ones go
through a ring); on a class marked ``overlap`` the phase's fixed costs and its
bytes overlap, and the larger of the two counts; every reorder pass costs
one copy of the buffer at the copy rate, the lower one once the buffer passes the copy's threshold (the
job's buffers no longer fit the last-level cache). The terms add up: a rank runs its phases one after the other, and
the model charges the messages of one phase in sequence too (alpha is the
cost per message as measured in a whole exchange, with whatever overlap
the transport achieves folded in). The prediction is piecewise linear in
the size: its slope changes where a phase's messages cross a protocol
threshold (``breakpoints``).

A phase's link class is what ``Communicator.links`` reports for it, or, for
a plan built offline, the profile's intra-node class when the phase stays
inside one node and its inter-node class otherwise. Inside a phase that
spans nodes, messages to peers on the same node go over the profile's
intra-node class (NCCL sends them over NVLink; gloo over loopback).

The coordinated plan (the EP all-to-all, then the TP all-gather) adds the
copies of its Python composition: taking this TP rank's chunks (1/tp of
the buffer) and reassembling the gathered chunks (the whole buffer).
Uneven exchanges' count messages are not modelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alltoall._library import _C
from alltoall.plan.profile import Profile


@dataclass(frozen=True)
class Cost:
    """One term of a prediction: a phase's messages on one link class, or a
    local copy pass (``link`` = "copy")."""

    label: str
    link: str
    messages: int
    bytes: float
    time_us: float


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one rank's exchange of ``bytes_per_rank``."""

    algorithm: str
    bytes_per_rank: float
    profile: str
    costs: tuple[Cost, ...]

    @property
    def time_us(self) -> float:
        return sum(c.time_us for c in self.costs)

    def by_link(self) -> dict[str, float]:
        """Microseconds per link class ("copy" for the copy passes)."""
        out: dict[str, float] = {}
        for c in self.costs:
            out[c.link] = out.get(c.link, 0.0) + c.time_us
        return out

    def describe(self) -> str:
        lines = [f"{self.algorithm}: {self.time_us:.1f} us for {self.bytes_per_rank:.0f} B per rank "
                 f"(profile {self.profile})"]
        lines += [f"  {c.label:<28} {c.link:<6} {c.messages:>5} msg {c.bytes:>14.0f} B {c.time_us:>12.2f} us"
                  for c in self.costs]
        return "\n".join(lines)


def default_links(raw: _C.ExchangePlan, node_of_rank: Sequence[int], profile: Profile) -> tuple[str, ...]:
    """Per phase: the profile's intra-node class when the phase's group is on
    one node, its inter-node class otherwise."""
    return tuple(profile.intra_node if len({node_of_rank[r] for r in phase.group_ranks}) == 1
                 else profile.inter_node for phase in raw.phases)


def _messages_by_class(rank: int, phase, node_of_rank: Sequence[int], profile: Profile, link: str,
                       split_by_node: bool) -> list[tuple[str, int]]:
    """(class, messages) of ``rank``'s messages in ``phase`` on ``link``: to
    peers on its own node over the intra-node class when the phase spans
    nodes (and ``split_by_node``), the rest over ``link``."""
    peers = [r for r in phase.group_ranks if r != rank]
    spans_nodes = split_by_node and len({node_of_rank[r] for r in phase.group_ranks}) > 1
    if not spans_nodes or (profile.intra_node == link and profile.link(link).overlap):
        return [(link, len(peers))]
    near = sum(1 for r in peers if node_of_rank[r] == node_of_rank[rank])
    return [(profile.intra_node, near), (link, len(peers) - near)]


def predict_plan(
    raw: _C.ExchangePlan,
    node_of_rank: Sequence[int],
    bytes_per_rank: float,
    profile: Profile,
    links: Sequence[str] | None = None,
    *,
    split_by_node: bool = True,
) -> Prediction:
    """The predicted time of ``raw`` (the plan of rank ``raw.rank`` of a group
    whose rank r is on node ``node_of_rank[r]``) for a send buffer of
    ``bytes_per_rank`` bytes split equally among ``raw.num_blocks`` blocks.

    ``links`` gives each phase's link class (``Communicator.links``);
    default: ``default_links``. ``split_by_node=False`` charges every
    message of a phase to its class, for nodes emulated on one host, where
    same-node peers are no closer than the others.
    """
    if bytes_per_rank < 0:
        raise ValueError(f"bytes_per_rank must be >= 0, got {bytes_per_rank}")
    if len(node_of_rank) != raw.world_size:
        raise ValueError(f"node_of_rank has {len(node_of_rank)} entries for a plan of {raw.world_size} ranks")
    phases = list(raw.phases)
    links = tuple(links) if links is not None else default_links(raw, node_of_rank, profile)
    if len(links) != len(phases):
        raise ValueError(f"links={list(links)} has {len(links)} entries for a {raw.algorithm} plan of "
                         f"{len(phases)} phases")
    block = bytes_per_rank / raw.num_blocks
    costs: list[Cost] = []

    def copy(label: str, blocks: float) -> None:
        nbytes = blocks * block
        costs.append(Cost(label, "copy", 1, nbytes, profile.copy.time_us(1, nbytes, nbytes)))

    if raw.algorithm == "coordinated":
        copy("take chunks", raw.num_blocks / raw.tp)
    for i, (phase, link) in enumerate(zip(phases, links, strict=True)):
        name = f"phase {i + 1} {phase.collective} ({phase.role})"
        own = profile.link(link)
        if own.phase_us and not own.overlap:
            costs.append(Cost(f"{name} fixed", link, 0, 0.0, own.phase_us))
        if len(phase.pre_permutation):
            copy(f"reorder before phase {i + 1}", len(phase.pre_permutation))
        each = phase.blocks_per_peer * block
        for cls, messages in _messages_by_class(raw.rank, phase, node_of_rank, profile, link, split_by_node):
            if cls == link and own.overlap:
                # Bytes move while the fixed costs are paid: the larger counts.
                fixed = own.phase_us + messages * own.alpha_us
                moving = own.time_us(0, messages * each, each)
                costs.append(Cost(f"{name} max(fixed, bytes)", link, messages, messages * each, max(fixed, moving)))
            elif messages:
                costs.append(Cost(name, cls, messages, messages * each,
                                  profile.link(cls).time_us(messages, messages * each, each)))
    if len(raw.post_permutation):
        copy("reorder after the last phase", len(raw.post_permutation))
    if raw.algorithm == "coordinated":
        copy("gather chunks", raw.num_blocks)
    elif not phases:
        copy("copy (group of one)", raw.num_blocks)
    return Prediction(raw.algorithm, bytes_per_rank, profile.name, tuple(costs))


def breakpoints(raw: _C.ExchangePlan, profile: Profile, node_of_rank: Sequence[int] | None = None,
                links: Sequence[str] | None = None, *, split_by_node: bool = True) -> tuple[float, ...]:
    """The sizes (bytes per rank) at which ``raw``'s prediction may change
    slope: where a phase's messages reach the protocol threshold of a class
    of the profile (every class is considered, whichever the phase runs on:
    a spare breakpoint only splits a line in two), where a copy pass
    reaches the copy's threshold, and, given ``node_of_rank`` (and the
    phases' ``links``, as for ``predict_plan``), where a phase on an
    ``overlap`` class passes from its fixed costs to its bytes. Between two
    of them the prediction is a straight line."""
    out = {cost.large_bytes * raw.num_blocks / phase.blocks_per_peer
           for phase in raw.phases if phase.blocks_per_peer
           for cost in profile.links.values() if cost.large_bytes and cost.large_gbps is not None}
    if profile.copy.large_bytes and profile.copy.large_gbps is not None:
        passes = {len(p.pre_permutation) for p in raw.phases} | {len(raw.post_permutation), raw.num_blocks,
                                                                  raw.num_blocks / raw.tp}
        out |= {profile.copy.large_bytes * raw.num_blocks / blocks for blocks in passes if blocks}
    if node_of_rank is not None:
        phases = list(raw.phases)
        links = tuple(links) if links is not None else default_links(raw, node_of_rank, profile)
        for phase, link in zip(phases, links, strict=True):
            own = profile.link(link)
            if not own.overlap or not phase.blocks_per_peer:
                continue
            messages = dict(_messages_by_class(raw.rank, phase, node_of_rank, profile, link, split_by_node))[link]
            fixed = own.phase_us + messages * own.alpha_us
            if not messages or not fixed:
                continue
            share = messages * phase.blocks_per_peer / raw.num_blocks  # the phase's bytes per byte of the buffer
            for gbps in {own.gbps, own.large_gbps or own.gbps}:
                size = fixed * gbps * 1e3 / share  # bytes / (gbps * 1e3) == fixed
                if own.gbps_for(size * phase.blocks_per_peer / raw.num_blocks) == gbps:
                    out.add(size)
    return tuple(sorted(out))
