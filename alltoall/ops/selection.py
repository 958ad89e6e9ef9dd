"""The rule behind algorithm="auto".

With a cost profile (alltoall.plan.profile: ALLTOALL_PROFILE, or the file
``alltoall-bench --calibrate`` writes), "auto" takes, for each call's size,
the algorithm the model predicts fastest (alltoall.plan.model). The
prediction is the slowest rank's, computed from data every rank holds
identically (the profile, whose hash the Communicator checks on every rank,
the topology, and every rank's link classes, gathered once), so every rank
picks the same algorithm without communicating.

Without a profile, the fixed rule: hierarchical only pays where intra-node
links are faster than inter-node ones and messages are small enough to be
latency-bound (DeepSpeed-MoE, section 5.3; Tutel's 2DH). On one host, every
message costs the same and the extra copies make it slower, so emulated
nodes never pick it. The bound, 8 KiB per peer, is where hierarchical
stopped winning on the emulated clusters of docs/performance.md (2x4 and 4x2
hosts, 1 Gbit/s links, gloo). Set ALLTOALL_AUTO_MAX_PEER_BYTES to move it.

Uneven exchanges (sizes differ by rank) decide on the topology alone in
both cases: hierarchical where a hierarchy exists (it bounds the messages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alltoall._env import env_int
from alltoall.plan import Profile, breakpoints, make_plan, predict_plan
from alltoall.plan import profile as profiles
from alltoall.topology import Topology

MAX_PEER_BYTES_ENV = "ALLTOALL_AUTO_MAX_PEER_BYTES"
DEFAULT_MAX_PEER_BYTES = 8 * 1024
# Above this many ranks, the slowest rank is sought among one node's ranks
# only: plans of a uniform topology are the same up to relabelling.
ALL_RANKS_UP_TO = 128
# "auto" remembers its choice for this many distinct sizes (then computes the rest).
MEMO_SIZES = 4096


def max_peer_bytes() -> int:
    return env_int(MAX_PEER_BYTES_ENV, DEFAULT_MAX_PEER_BYTES)


def hierarchy_possible(topology: Topology) -> bool:
    """Real (not emulated) nodes, at least two of them, of equal size > 1."""
    g = topology.ranks_per_node
    return not topology.emulated and topology.num_nodes > 1 and g is not None and g > 1


def hierarchical_up_to(topology: Topology) -> int | None:
    """The bytes per peer up to which equal splits go hierarchical; None when
    they never do on this topology."""
    return max_peer_bytes() if hierarchy_possible(topology) else None


def choose(topology: Topology, bytes_per_peer: int | None) -> str:
    """The fixed rule: 'hierarchical' or 'flat'. Every rank must reach the
    same answer, so uneven exchanges (whose sizes differ by rank) pass
    bytes_per_peer=None and decide on the topology alone."""
    limit = hierarchical_up_to(topology)
    if limit is None:
        return "flat"
    if bytes_per_peer is None:
        return "hierarchical"
    return "hierarchical" if bytes_per_peer <= limit else "flat"


@dataclass
class ModelSelector:
    """Chooses by predicted time. Built from identical data on every rank.

    ``links[r][algorithm]`` is group rank r's link class of every phase.
    """

    profile: Profile
    topology: Topology
    links: Sequence[dict[str, tuple[str, ...]]]
    algorithms: tuple[str, ...]
    rank_order: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self._memo: dict[int, str] = {}
        topo = self.topology
        if topo.size <= ALL_RANKS_UP_TO or not topo.uniform:
            self._ranks: tuple[int, ...] = tuple(range(topo.size))
        else:
            self._ranks = tuple(topo.ranks_of_node(0))
        self._plans = {a: [make_plan(topo.node_of_rank, r, a, rank_order=self.rank_order) for r in self._ranks]
                       for a in self.algorithms}
        # The model is piecewise linear in the size (its slope changes where
        # messages cross a protocol threshold): between two breakpoints each
        # rank's prediction is a line (us at the segment's start, us per
        # byte). "auto" evaluates the slowest rank's with plain arithmetic,
        # which torch.compile traces. This also fails here, at creation, when
        # the profile lacks a class in use.
        split = not topo.emulated
        cuts = sorted({0.0, *(b for a, plans in self._plans.items() for r, raw in zip(self._ranks, plans, strict=True)
                              for b in breakpoints(raw, self.profile, topo.node_of_rank, self.links[r][a],
                                                   split_by_node=split))})
        self._starts = tuple(cuts)
        self._segments: list[dict[str, list[tuple[float, float]]]] = []
        for i, start in enumerate(cuts):
            step = (cuts[i + 1] - start) / 2 if i + 1 < len(cuts) else float(1 << 20)
            at_start, at_step = self.predict_all(start), self.predict_all(start + step)
            self._segments.append({a: sorted({(z - start * (m - z) / step, (m - z) / step)
                                              for z, m in zip(at_start[a], at_step[a], strict=True)})
                                   for a in self.algorithms})

    def predict_all(self, bytes_per_rank: float) -> dict[str, list[float]]:
        """Per algorithm, every considered rank's predicted microseconds."""
        split = not self.topology.emulated
        return {
            a: [predict_plan(raw, self.topology.node_of_rank, bytes_per_rank, self.profile, self.links[r][a],
                             split_by_node=split).time_us
                for r, raw in zip(self._ranks, self._plans[a], strict=True)]
            for a in self.algorithms
        }

    def predict_us(self, bytes_per_rank: float) -> dict[str, float]:
        """Per algorithm, the slowest rank's predicted microseconds."""
        return {a: max(times) for a, times in self.predict_all(bytes_per_rank).items()}

    def choose(self, bytes_per_peer: int) -> str:
        """The fastest predicted algorithm; ties go to the earlier one.
        Remembered per size outside torch.compile: a training loop repeats
        a few sizes, and on ranks that share cores every microsecond of a
        call's CPU is paid several times over in wall time."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            known = self._memo.get(bytes_per_peer)
            if known is not None:
                return known
        best = self._fastest(bytes_per_peer)
        if not compiling and len(self._memo) < MEMO_SIZES:
            self._memo[bytes_per_peer] = best
        return best

    def _fastest(self, bytes_per_peer: int) -> str:
        size = bytes_per_peer * self.topology.size
        lines = self._segments[0]
        for start, segment in zip(self._starts, self._segments, strict=True):
            if size >= start:
                lines = segment
        best, best_us = self.algorithms[0], None
        for a in self.algorithms:
            us = max(zero + slope * size for zero, slope in lines[a])
            if best_us is None or us < best_us:
                best, best_us = a, us
        return best


def _describe(entry: tuple) -> str:
    kind, value, name = entry
    if kind == "none":
        return "no profile"
    if kind == "error":
        return f"an unreadable profile ({value})"
    return f"profile {name!r} (hash {value})"


def agree_on_profile(
    group: dist.ProcessGroup, group_name: str, global_ranks: Sequence[int], links: dict[str, tuple[str, ...]]
) -> tuple[Profile | None, list[dict[str, tuple[str, ...]]]]:
    """Collective: loads this rank's active profile, gathers every rank's
    (profile hash, link classes), and returns (profile, links by rank).

    Raises ValueError on every rank, naming the ranks and hashes, when the
    ranks did not load the same profile (or one could not read its file).
    """
    profile = None
    try:
        profile = profiles.active()
        entry = ("none", "", "") if profile is None else ("hash", profile.hash, profile.name)
    except ValueError as error:
        entry = ("error", str(error), "")
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (entry, links), group=group)
    entries = [e for e, _ in gathered]
    if any(e[0] == "error" for e in entries) or len({e[:2] for e in entries}) > 1:
        kinds: dict[str, list[int]] = {}
        for r, e in enumerate(entries):
            kinds.setdefault(_describe(e), []).append(global_ranks[r])
        found = "; ".join(f"ranks {ranks} have {what}" for what, ranks in kinds.items())
        raise ValueError(
            f"Communicator on group '{group_name}': every rank must load the same cost profile "
            f"({profiles.PROFILE_ENV} or {profiles.default_path()}), but {found}")
    return profile, [lk for _, lk in gathered]
