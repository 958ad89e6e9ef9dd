"""The calibration's fit on synthetic timings: it recovers known alpha and bandwidth."""

from __future__ import annotations

import math

import pytest

from alltoall.cli.calibrate_fit import Sample, fit_all, fit_link
from alltoall.plan import LinkCost

SIZES = [1024 * 4**i for i in range(7)]


def synthetic(link: str, cost: LinkCost, group: int, noise: float = 0.0) -> list[Sample]:
    """Flat exchanges on a group of ``group`` ranks, with a deterministic
    +-noise ripple on the times."""
    out = []
    for i, b in enumerate(SIZES):
        sent = b * (group - 1) / group
        ripple = 1 + noise * math.sin(1.7 * i + group)
        out.append(Sample(link, group - 1, sent, cost.time_us(group - 1, sent) * ripple))
    return out


def test_recovers_exact_parameters():
    tcp, shm = LinkCost(180.0, 0.35), LinkCost(12.0, 2.5)
    fits = fit_all(synthetic("tcp", tcp, 4) + synthetic("tcp", tcp, 2) + synthetic("shm", shm, 4))
    assert set(fits) == {"shm", "tcp"}
    for link, truth in (("tcp", tcp), ("shm", shm)):
        assert fits[link].cost.alpha_us == pytest.approx(truth.alpha_us, rel=1e-6)
        assert fits[link].cost.gbps == pytest.approx(truth.gbps, rel=1e-6)
        assert fits[link].max_error < 1e-9 and fits[link].samples == len(SIZES) * (2 if link == "tcp" else 1)


def test_noisy_timings_stay_close_and_report_the_error():
    truth = LinkCost(300.0, 0.12)
    fit = fit_link(synthetic("tcp", truth, 8, noise=0.05))
    assert fit.cost.alpha_us == pytest.approx(truth.alpha_us, rel=0.1)
    assert fit.cost.gbps == pytest.approx(truth.gbps, rel=0.1)
    assert 0.01 < fit.max_error < 0.12  # the ripple shows up as fit error


def test_latency_below_resolution_clamps_alpha_at_zero():
    # Times that fall under the bytes line at small sizes would fit alpha < 0.
    samples = [Sample("copy", 1, b, b * 1e-4 * (0.5 if b < 8192 else 1.0)) for b in SIZES]
    fit = fit_link(samples)
    assert fit.cost.alpha_us == 0.0
    assert 10.0 <= fit.cost.gbps <= 20.0  # between the two lines the samples lie on
    assert fit.max_error > 0.1


def test_one_size_cannot_separate_alpha_from_bandwidth():
    with pytest.raises(ValueError, match="at least two"):
        fit_link([Sample("tcp", 3, 1024, 50.0)])
    with pytest.raises(ValueError, match="do not separate"):
        fit_link([Sample("tcp", 3, 1024, 50.0), Sample("tcp", 3, 1024, 51.0)])
