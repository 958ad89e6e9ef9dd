"""The fit behind ``alltoall-bench --calibrate``: a cost profile's numbers from
timed exchanges. Pure arithmetic; the sweep is in calibrate.py.

Each exchange sample is one timed call on one link class: ``messages`` sent
per rank, ``bytes`` sent per rank, and the measured microseconds. The model

    time = phase + messages * alpha[link] + bytes / bandwidth[link]

(a flat exchange is one phase) has one ``phase`` shared by every class (the
fixed cost of a collective call) and alpha, bandwidth per class. It is fitted by least squares on
relative errors (every size weighs the same, from 1 KiB to MiBs) with every
term >= 0: a term that comes out negative is pinned at 0 and the rest
refitted. ``phase`` and alpha are told apart by groups with different
message counts; when every class was timed with one count only, ``phase``
is 0 and alpha carries it. Copy passes (``link`` = "copy", one "message"
per pass) are fitted on their own, without ``phase``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    phase_us: float
    links: dict[str, FitResult]  # link classes, and "copy"

    def predicted_us(self, s: Sample) -> float:
        return (0.0 if s.link == COPY else self.phase_us) + self.links[s.link].cost.time_us(s.messages, s.bytes)


def _nonnegative_lstsq(a: np.ndarray, t: np.ndarray) -> np.ndarray:
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


def _errors(fit: Fit, samples: Sequence[Sample]) -> tuple[float, float]:
    errs = [abs(fit.predicted_us(s) - s.time_us) / s.time_us for s in samples]
    return max(errs), sum(errs) / len(errs)


def fit_all(samples: Iterable[Sample]) -> Fit:
    """Fits phase, alpha and bandwidth of every class (and copy) present."""
    samples = [s for s in samples if s.time_us > 0]
    exchange = [s for s in samples if s.link != COPY]
    copies = [s for s in samples if s.link == COPY]
    links = sorted({s.link for s in exchange})
    for link in [*links, *([COPY] if copies else [])]:
        group = [s for s in samples if s.link == link]
        if len({s.bytes for s in group}) < 2:
            raise ValueError(f"{link}: the samples do not separate alpha from bandwidth: time more than one size "
                             f"(got {len(group)} sample(s))")
    params: dict[str, tuple[float, float]] = {}
    phase = 0.0
    if exchange:
        # Columns: phase, then (alpha, per byte) of every class.
        a = np.zeros((len(exchange), 1 + 2 * len(links)))
        for i, s in enumerate(exchange):
            j = 1 + 2 * links.index(s.link)
            a[i, 0], a[i, j], a[i, j + 1] = 1.0, s.messages, s.bytes
        t = np.array([s.time_us for s in exchange])
        if np.linalg.matrix_rank(a) < a.shape[1]:
            a[:, 0] = 0.0  # one message count per class: phase folds into alpha
        x = _nonnegative_lstsq(a, t)
        phase = float(x[0])
        params = {link: (float(x[1 + 2 * k]), float(x[2 + 2 * k])) for k, link in enumerate(links)}
    if copies:
        a = np.array([[1.0, s.bytes] for s in copies])
        x = _nonnegative_lstsq(a, np.array([s.time_us for s in copies]))
        params[COPY] = (float(x[0]), float(x[1]))
    costs = {link: LinkCost(alpha, UNRESOLVED_GBPS if per_byte <= 0 else min(UNRESOLVED_GBPS, 1e-3 / per_byte))
             for link, (alpha, per_byte) in params.items()}
    draft = Fit(phase, {link: FitResult(cost, 0, 0.0, 0.0) for link, cost in costs.items()})
    results = {}
    for link, cost in costs.items():
        group = [s for s in samples if s.link == link]
        worst, mean = _errors(draft, group)
        results[link] = FitResult(cost, len(group), worst, mean)
    return Fit(phase, results)
