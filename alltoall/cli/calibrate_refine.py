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

TCP between hosts has no protocol switch of its own, but through a shaped
link large messages lose throughput, and a link drains one rank's bytes
while the shared CPUs run the other ranks' calls: on the emulated clusters
a flat exchange over TCP took the same time from 1 to 256 KiB per rank,
then grew at the link's rate (the larger of fixed costs and bytes, not
their sum). The stage therefore also tries, for "tcp", a second byte cost
from each of ``TCP_THRESHOLDS`` on, with and without ``overlap``, and
keeps the combination with the smallest root-mean-square error (ties keep
the simpler one). With ``overlap`` the prediction is no longer linear in
the parameters; the fit then takes Gauss-Newton steps from the additive
fit and from the first stage's values. Classes and parameters that no plan
sample exercises keep the first stage's values.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from alltoall.cli.calibrate_fit import gbps_of, nonnegative_lstsq
from alltoall.plan import LinkCost, Profile, make_plan
from alltoall.plan.model import predict_plan

# Candidate message sizes from which "tcp" gets a second byte cost (0: none).
TCP_THRESHOLDS = (0, 64 * 1024, 256 * 1024, 1024 * 1024)
# Gauss-Newton steps of a fit with an ``overlap`` class (it converged in 3-8 on this machine's samples).
OVERLAP_STEPS = 20
# Root-mean-square errors closer than this are a tie between two fits.
TIE = 1e-6
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

    @property
    def tcp_overlap(self) -> bool:
        tcp = self.profile.links.get("tcp")
        return tcp is not None and tcp.overlap

    def to_json(self) -> dict:
        return {"samples": self.samples, "max_relative_error": round(self.max_error, 4),
                "mean_relative_error": round(self.mean_error, 4), "tcp_large_bytes": self.tcp_threshold,
                "tcp_overlap": self.tcp_overlap}


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


def _values(profile: Profile, params: Sequence[Parameter]) -> np.ndarray:
    """``params``' values in ``profile``, byte costs as us per byte (the inverse of ``_apply``)."""
    out = []
    for name, field_name in params:
        value = getattr(profile.copy if name == "copy" else profile.links[name], field_name)
        out.append(1e-3 / value if field_name in ("gbps", "large_gbps") else value)
    return np.array(out, dtype=float)


def _jacobian(profile: Profile, params: Sequence[Parameter], x: np.ndarray,
              samples: Sequence[PlanSample]) -> np.ndarray:
    """d prediction / d parameter at ``x``, by differences. An ``overlap``
    class makes the prediction the larger of two linear forms: piecewise
    linear and homogeneous in the parameters, so its Jacobian at x, times
    x, is the prediction at x, and a least-squares step on it is exact
    while no sample changes branch."""
    base = np.array([s.predict_us(_apply(profile, params, list(x))) for s in samples])
    out = np.zeros((len(samples), len(params)))
    for j in range(len(params)):
        step = max(abs(x[j]) * 1e-6, 1e-12)
        moved = x.copy()
        moved[j] += step
        out[:, j] = (np.array([s.predict_us(_apply(profile, params, list(moved))) for s in samples]) - base) / step
    return out


def _fit_once(profile: Profile, samples: Sequence[PlanSample]) -> tuple[Profile, np.ndarray]:
    # Phases that span nodes also charge the intra-node class.
    classes = sorted(({link for s in samples for link in s.links} | {profile.intra_node}) & set(profile.links))
    params = _parameters(profile, classes)
    flat_profile = replace(profile, links={k: replace(v, overlap=False) for k, v in profile.links.items()})
    a = np.array([[s.predict_us(_unit(flat_profile, p)) for p in params] for s in samples])
    t = np.array([s.time_us for s in samples])
    # A parameter no sample exercises keeps the first stage's value.
    used = [j for j in range(len(params)) if np.any(a[:, j])]
    x = _values(profile, params)
    x[used] = nonnegative_lstsq(a[:, used], t)
    if any(profile.links[c].overlap for c in classes):
        # Gauss-Newton: each step solves the linear problem of the branches
        # the current values select. Started from the additive fit and from
        # the profile as given (one may sit on the wrong side of a knee).
        best, best_score = x, _score(profile, params, x, samples)
        for start in (x, _values(profile, params)):
            current = start.copy()
            for _ in range(OVERLAP_STEPS):
                step = current.copy()
                step[used] = nonnegative_lstsq(_jacobian(profile, params, current, samples)[:, used], t)
                score = _score(profile, params, step, samples)
                if score < best_score - 1e-12:
                    best, best_score = step, score
                if np.allclose(step, current, rtol=1e-9, atol=1e-15):
                    break
                current = step
        x = best
    fitted = _apply(profile, [params[j] for j in used], [float(x[j]) for j in used])
    errors = np.array([abs(s.predict_us(fitted) - s.time_us) / s.time_us for s in samples])
    return fitted, errors


def _score(profile: Profile, params: Sequence[Parameter], x: np.ndarray, samples: Sequence[PlanSample]) -> float:
    """Root mean square relative error: what the least squares minimise."""
    fitted = _apply(profile, params, list(x))
    return float(np.sqrt(np.mean([((s.predict_us(fitted) - s.time_us) / s.time_us) ** 2 for s in samples])))


def refine(profile: Profile, samples: Sequence[PlanSample]) -> Refinement:
    """The profile refitted on ``samples`` (see the module docstring)."""
    samples = [s for s in samples if s.time_us > 0]
    if len(samples) < 2:
        raise ValueError(f"refine needs at least two timed plan samples, got {len(samples)}")
    uses_tcp = any("tcp" in s.links for s in samples) and "tcp" in profile.links
    best: tuple[Profile, np.ndarray, int, float] | None = None
    for threshold, overlap in itertools.product(TCP_THRESHOLDS, (False, True)) if uses_tcp else [(None, False)]:
        start = profile
        if threshold is not None:
            tcp = profile.links["tcp"]
            start = replace(profile, links={**profile.links, "tcp": replace(
                tcp, large_bytes=threshold, large_gbps=tcp.gbps if threshold else None, overlap=overlap)})
        fitted, errors = _fit_once(start, samples)
        score = float(np.sqrt(np.mean(errors ** 2)))
        if best is None or score < best[3] - TIE:  # ties keep the simpler model (tried first)
            best = (fitted, errors, threshold or 0, score)
    assert best is not None
    fitted, errors, threshold, _ = best
    return Refinement(fitted, len(samples), float(errors.max()), float(errors.mean()), threshold)


__all__ = ["TCP_THRESHOLDS", "PlanSample", "Refinement", "refine"]
