"""The fit behind ``alltoall-bench --calibrate``: a cost profile's numbers from
timed exchanges. Pure arithmetic; the sweep is in calibrate.py.

Each exchange sample is one timed flat exchange on a group of
``messages + 1`` ranks, on one link class: ``bytes`` sent per rank in
messages of ``message_bytes``, and the measured microseconds. The model is
the one alltoall.plan.model predicts with, for one phase:

    time = phase[link] + messages * alpha[link] + bytes / bandwidth[link, protocol]

where the protocol is the large-message one when ``message_bytes`` reaches
the class's threshold (``thresholds``, read from the transport's settings by
the sweep; shared memory: single copy from ALLTOALL_SHM_SINGLE_COPY_BYTES)
and the small-message one below it. Each class is fitted on its own, by
least squares on relative errors (every size weighs the same, from 1 KiB
to MiBs, as in a fit of log time) with every term >= 0: a term that comes
out negative is pinned at 0 and the rest refitted. ``phase`` and alpha are
told apart by groups of different sizes; when a class was timed on one
group size only, ``phase`` is 0 and alpha carries it. A protocol seen in
fewer than two sizes is not fitted: its bytes go at the other protocol's
bandwidth. Copy passes (``link`` = "copy", one "message" per pass) are
fitted the same way, without ``phase``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from alltoall.plan import LinkCost

# The bandwidth reported when the bytes term fits at 0 (time not growing with size).
UNRESOLVED_GBPS = 1e6
COPY = "copy"


@dataclass(frozen=True)
class Sample:
    link: str
    messages: int
    bytes: float
    time_us: float
    message_bytes: float | None = None  # None: bytes / messages

    @property
    def each(self) -> float:
        return self.message_bytes if self.message_bytes is not None else self.bytes / max(1, self.messages)


@dataclass(frozen=True)
class FitResult:
    cost: LinkCost
    samples: int
    max_error: float  # max |predicted - measured| / measured
    mean_error: float

    def to_json(self) -> dict:
        return {"samples": self.samples, "max_relative_error": round(self.max_error, 4),
                "mean_relative_error": round(self.mean_error, 4)}


@dataclass(frozen=True)
class Fit:
    links: dict[str, FitResult]  # link classes, and "copy"

    def predicted_us(self, s: Sample) -> float:
        cost = self.links[s.link].cost
        return cost.phase_us + cost.time_us(s.messages, s.bytes, s.each)


def nonnegative_lstsq(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """argmin ||(a x - t) / t|| with x >= 0, by pinning negative terms at 0."""
    w = 1.0 / t
    free = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while free:
        sub = a[:, free] * w[:, None]
        sol, *_ = np.linalg.lstsq(sub, t * w, rcond=None)
        if (sol >= 0).all():
            x[free] = sol
            return x
        free.pop(int(np.argmin(sol)))  # the most negative term goes to 0
    return x


def gbps_of(per_byte: float) -> float:
    """A byte cost (us per byte) as a bandwidth (GB/s); 0 or less: UNRESOLVED_GBPS."""
    return UNRESOLVED_GBPS if per_byte <= 0 else min(UNRESOLVED_GBPS, 1e-3 / per_byte)


def fit_class(link: str, group: Sequence[Sample], threshold: int = 0) -> LinkCost:
    """phase, alpha, and the bandwidth of each protocol of one class."""
    if len({s.bytes for s in group}) < 2:
        raise ValueError(f"{link}: the samples do not separate alpha from bandwidth: time more than one size "
                         f"(got {len(group)} sample(s))")
    large = [threshold > 0 and s.each >= threshold for s in group]
    split = threshold > 0 and len({s.bytes for s, big in zip(group, large, strict=True) if big}) >= 2 \
        and len({s.bytes for s, big in zip(group, large, strict=True) if not big}) >= 2
    # Columns: phase, alpha, per byte (small messages), per byte (large messages).
    a = np.zeros((len(group), 4))
    for i, (s, big) in enumerate(zip(group, large, strict=True)):
        a[i, 0], a[i, 1] = (0.0 if link == COPY else 1.0), s.messages
        a[i, 3 if split and big else 2] = s.bytes
    if not split:
        a = a[:, :3]
    if np.linalg.matrix_rank(a[:, :2]) < 2:
        a[:, 0] = 0.0  # one group size: phase folds into alpha
    x = nonnegative_lstsq(a, np.array([s.time_us for s in group]))
    return LinkCost(alpha_us=float(x[1]), gbps=gbps_of(float(x[2])), phase_us=float(x[0]),
                    large_bytes=threshold if split else 0, large_gbps=gbps_of(float(x[3])) if split else None)


def fit_all(samples: Iterable[Sample], thresholds: Mapping[str, int] | None = None) -> Fit:
    """Fits phase, alpha and bandwidth(s) of every class (and copy) present.
    ``thresholds[link]``: the message size from which the class uses its
    large-message protocol (absent or 0: one protocol)."""
    samples = [s for s in samples if s.time_us > 0]
    thresholds = thresholds or {}
    links = sorted({s.link for s in samples if s.link != COPY}) + ([COPY] if any(s.link == COPY for s in samples)
                                                                  else [])
    costs = {link: fit_class(link, [s for s in samples if s.link == link], thresholds.get(link, 0))
             for link in links}
    draft = Fit({link: FitResult(cost, 0, 0.0, 0.0) for link, cost in costs.items()})
    results = {}
    for link, cost in costs.items():
        group = [s for s in samples if s.link == link]
        errs = [abs(draft.predicted_us(s) - s.time_us) / s.time_us for s in group]
        results[link] = FitResult(cost, len(group), max(errs), sum(errs) / len(errs))
    return Fit(results)
