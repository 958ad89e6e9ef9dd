"""The fit behind ``alltoall-bench --calibrate``: alpha and bandwidth per link
class from timed exchanges. Pure arithmetic; the sweep is in calibrate.py.

Each sample is one timed exchange on one link class: ``messages`` sent per
rank, ``bytes`` sent per rank, and the measured microseconds. The model
``time = messages * alpha + bytes / bandwidth`` is fitted by least squares
on relative errors (every size weighs the same, from 1 KiB to MiBs), with
alpha >= 0. Copy passes are fitted the same way with one "message" per pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from alltoall.plan import LinkCost

# A bandwidth the fit reports when the bytes term is not resolved (all samples
# the same size, or time falling with size): effectively free bytes.
UNRESOLVED_GBPS = 1e6


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


def _weighted_lstsq(rows: Sequence[tuple[float, float]], targets: Sequence[float]) -> tuple[float, float]:
    """Minimises sum(((a x + b y) - t) / t)^2 over (x, y): 2x2 normal equations."""
    s_aa = s_ab = s_bb = s_at = s_bt = 0.0
    for (a, b), t in zip(rows, targets, strict=True):
        w = 1.0 / (t * t)
        s_aa += w * a * a
        s_ab += w * a * b
        s_bb += w * b * b
        s_at += w * a * t
        s_bt += w * b * t
    det = s_aa * s_bb - s_ab * s_ab
    if abs(det) <= 1e-12 * max(s_aa * s_bb, 1e-300):
        raise ValueError("the samples do not separate alpha from bandwidth: time more than one size")
    return (s_at * s_bb - s_bt * s_ab) / det, (s_aa * s_bt - s_ab * s_at) / det


def fit_link(samples: Iterable[Sample]) -> FitResult:
    """alpha (us per message) and bandwidth (GB/s) of one class."""
    samples = [s for s in samples if s.time_us > 0]
    if len(samples) < 2:
        raise ValueError(f"a fit needs at least two timed sizes, got {len(samples)}")
    rows = [(float(s.messages), float(s.bytes)) for s in samples]
    times = [s.time_us for s in samples]
    alpha, per_byte = _weighted_lstsq(rows, times)
    if alpha < 0:  # latency below resolution: fit bytes alone
        alpha = 0.0
        per_byte = sum(b * t / t**2 for (_, b), t in zip(rows, times, strict=True)) / \
            sum(b * b / t**2 for (_, b), t in zip(rows, times, strict=True))
    if per_byte <= 0 or not math.isfinite(per_byte):
        per_byte = 1.0 / (UNRESOLVED_GBPS * 1e3)
        alpha = sum(t / m for (m, _), t in zip(rows, times, strict=True) if m) / max(1, sum(1 for m, _ in rows if m))
    cost = LinkCost(alpha_us=alpha, gbps=1.0 / (per_byte * 1e3))
    errors = [abs(cost.time_us(m, b) - t) / t for (m, b), t in zip(rows, times, strict=True)]
    return FitResult(cost, len(samples), max(errors), sum(errors) / len(errors))


def fit_all(samples: Iterable[Sample]) -> dict[str, FitResult]:
    """One fit per link class present in ``samples``."""
    by_link: dict[str, list[Sample]] = {}
    for s in samples:
        by_link.setdefault(s.link, []).append(s)
    return {link: fit_link(group) for link, group in sorted(by_link.items())}
