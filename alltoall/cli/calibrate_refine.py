"""The second stage of ``alltoall-bench --calibrate``: every parameter of the
profile refitted at once on whole exchanges of the plans "auto" chooses
between. Pure arithmetic; the sweep is in calibrate.py.

The first stage (calibrate_fit) fits each link class on its own, from flat
exchanges on the world, the node groups and the rail groups, each timed
alone after a barrier. The plans do not run their phases that way: a
hierarchical exchange runs the node phase and the rail phase back to back
(the second starts when its slowest member leaves the first), with reorder
passes between, and the phases of one exchange compete for the same cores.
Measured on this machine, the first stage alone predicted flat exchanges
of 4 MiB 46-64% too slow and small hierarchical ones 13-40% too fast.

So the sweep also times the flat and hierarchical plans themselves on the
world, on every transport, and this stage fits the profile's parameters
(per class: phase, alpha, the byte cost of each protocol; the copy pass's
alpha and byte costs) to those times, by least squares on relative errors
with every term >= 0, as the first stage does. The features are the model's
own: the prediction is linear in every parameter once the protocol
thresholds are fixed, so the coefficient of a parameter is the prediction
under a profile in which that parameter is 1 and every other is 0
(alltoall.plan.model.predict_plan; no second copy of the model's formula).

TCP has no protocol switch of its own, but through a shaped link large
messages lose throughput (a TCP flow's window against the shaper's queue).
The stage therefore also tries a second byte cost for "tcp" from each of
``TCP_THRESHOLDS`` on, and keeps the threshold (or none) with the smallest
worst error. Classes and parameters that no plan sample exercises keep the
first stage's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from alltoall.cli.calibrate_fit import gbps_of, nonnegative_lstsq
from alltoall.plan import LinkCost, Profile, make_plan
from alltoall.plan.model import predict_plan

# Candidate message sizes from which "tcp" gets a second byte cost (0: none).
TCP_THRESHOLDS = (0, 64 * 1024, 256 * 1024, 1024 * 1024)
_ZERO_GBPS = 1e30  # in unit profiles only: the term vanishes


@dataclass(frozen=True)
class PlanSample:
    """One timed exchange of a whole plan on the world: rank ``rank``'s plan
    of ``algorithm`` on nodes ``node_of_rank``, its phases on ``links``,
    ``bytes_per_rank`` bytes per rank, the slowest rank's mean ``time_us``."""

    algorithm: str
    node_of_rank: tuple[int, ...]
    rank: int
    links: tuple[str, ...]
    bytes_per_rank: float
    split_by_node: bool
    time_us: float

    def predict_us(self, profile: Profile) -> float:
        raw = make_plan(list(self.node_of_rank), self.rank, self.algorithm)
        return predict_plan(raw, self.node_of_rank, self.bytes_per_rank, profile, self.links,
                            split_by_node=self.split_by_node).time_us


@dataclass(frozen=True)
class Refinement:
    profile: Profile
    samples: int
    max_error: float
    mean_error: float
    tcp_threshold: int  # the chosen "tcp" large-message threshold, 0 for none

    def to_json(self) -> dict:
        return {"samples": self.samples, "max_relative_error": round(self.max_error, 4),
                "mean_relative_error": round(self.mean_error, 4), "tcp_large_bytes": self.tcp_threshold}


# A parameter: (class or "copy", field of LinkCost: alpha_us, phase_us, gbps or large_gbps).
Parameter = tuple[str, str]


def _parameters(profile: Profile, classes: Sequence[str]) -> list[Parameter]:
    out: list[Parameter] = []
    for name in [*classes, "copy"]:
        cost = profile.copy if name == "copy" else profile.links[name]
        fields = ["alpha_us", "gbps"] + ([] if name == "copy" else ["phase_us"])
        if cost.large_bytes and cost.large_gbps is not None:
            fields.append("large_gbps")
        out += [(name, f) for f in fields]
    return out


def _silent(cost: LinkCost) -> LinkCost:
    """``cost`` with every term 0 (same thresholds)."""
    return LinkCost(0.0, _ZERO_GBPS, 0.0, cost.large_bytes, _ZERO_GBPS if cost.large_gbps is not None else None)


def _unit(profile: Profile, param: Parameter) -> Profile:
    """``profile`` with every term 0 but ``param``, which is 1 (a byte cost
    of 1 us per byte): a prediction under it is that parameter's coefficient."""
    name, field_name = param
    links = {n: _silent(c) for n, c in profile.links.items()}
    copy = _silent(profile.copy)
    one = 1e-3 if field_name in ("gbps", "large_gbps") else 1.0  # 1e-3 GB/s = 1 byte per us
    if name == "copy":
        copy = replace(copy, **{field_name: one})
    else:
        links[name] = replace(links[name], **{field_name: one})
    return replace(profile, links=links, copy=copy)


def _apply(profile: Profile, params: Sequence[Parameter], values: Sequence[float]) -> Profile:
    """``profile`` with fitted values (byte costs in us per byte)."""
    links, copy = dict(profile.links), profile.copy
    for (name, field_name), value in zip(params, values, strict=True):
        if field_name in ("gbps", "large_gbps"):
            value = gbps_of(value)
        if name == "copy":
            copy = replace(copy, **{field_name: value})
        else:
            links[name] = replace(links[name], **{field_name: value})
    return replace(profile, links=links, copy=copy)


def _fit_once(profile: Profile, samples: Sequence[PlanSample]) -> tuple[Profile, np.ndarray]:
    # Phases that span nodes also charge the intra-node class.
    classes = sorted(({link for s in samples for link in s.links} | {profile.intra_node}) & set(profile.links))
    params = _parameters(profile, classes)
    a = np.array([[s.predict_us(_unit(profile, p)) for p in params] for s in samples])
    t = np.array([s.time_us for s in samples])
    # A parameter no sample exercises keeps the first stage's value.
    used = [j for j in range(len(params)) if np.any(a[:, j])]
    x = nonnegative_lstsq(a[:, used], t)
    fitted = _apply(profile, [params[j] for j in used], [float(v) for v in x])
    errors = np.array([abs(s.predict_us(fitted) - s.time_us) / s.time_us for s in samples])
    return fitted, errors


def refine(profile: Profile, samples: Sequence[PlanSample]) -> Refinement:
    """The profile refitted on ``samples`` (see the module docstring)."""
    samples = [s for s in samples if s.time_us > 0]
    if len(samples) < 2:
        raise ValueError(f"refine needs at least two timed plan samples, got {len(samples)}")
    uses_tcp = any("tcp" in s.links for s in samples) and "tcp" in profile.links
    best: tuple[Profile, np.ndarray, int] | None = None
    for threshold in TCP_THRESHOLDS if uses_tcp else (None,):
        start = profile
        if threshold is not None:
            tcp = profile.links["tcp"]
            start = replace(profile, links={**profile.links, "tcp": replace(
                tcp, large_bytes=threshold, large_gbps=tcp.gbps if threshold else None)})
        fitted, errors = _fit_once(start, samples)
        if best is None or errors.max() < best[1].max():
            best = (fitted, errors, threshold or 0)
    assert best is not None
    fitted, errors, threshold = best
    return Refinement(fitted, len(samples), float(errors.max()), float(errors.mean()), threshold)


__all__ = ["TCP_THRESHOLDS", "PlanSample", "Refinement", "refine"]
