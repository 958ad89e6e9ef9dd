"""The calibration's fit on synthetic timings: it recovers known call cost,
alpha and bandwidth per link class, and the copy rate."""

from __future__ import annotations

import math

import pytest

from alltoall.cli.calibrate_fit import Sample, fit_all
from alltoall.plan import LinkCost

SIZES = [1024 * 4**i for i in range(7)]  # the sweep's sizes, bytes per rank


def synthetic(link: str, cost: LinkCost, group: int, call: float = 0.0, noise: float = 0.0) -> list[Sample]:
    """Flat exchanges on groups of ``group`` ranks; a deterministic +-noise ripple."""
    out = []
    for i, b in enumerate(SIZES):
        sent = b * (group - 1) / group
        ripple = 1 + noise * math.sin(1.7 * i + group)
        out.append(Sample(link, group - 1, sent, (call + cost.time_us(group - 1, sent)) * ripple))
    return out


def copies(cost: LinkCost) -> list[Sample]:
    return [Sample("copy", 1, b, cost.time_us(1, b)) for b in SIZES]


def test_recovers_call_alpha_and_bandwidth_exactly():
    tcp, shm, copy = LinkCost(180.0, 0.35), LinkCost(12.0, 2.5), LinkCost(3.0, 4.0)
    call = 900.0
    samples = (synthetic("tcp", tcp, 4, call) + synthetic("tcp", tcp, 2, call)
               + synthetic("shm", shm, 4, call) + synthetic("shm", shm, 2, call) + copies(copy))
    fit = fit_all(samples)
    assert fit.phase_us == pytest.approx(call, rel=1e-6)
    assert set(fit.links) == {"copy", "shm", "tcp"}
    for link, truth in (("tcp", tcp), ("shm", shm), ("copy", copy)):
        got = fit.links[link]
        assert got.cost.alpha_us == pytest.approx(truth.alpha_us, rel=1e-6), link
        assert got.cost.gbps == pytest.approx(truth.gbps, rel=1e-6), link
        assert got.max_error < 1e-9
    assert fit.links["tcp"].samples == 2 * len(SIZES)


def test_one_message_count_per_class_folds_the_call_into_alpha():
    # Groups of 4 only: call and 3 alphas cannot be told apart, so call = 0
    # and alpha carries call / 3; predictions are still exact.
    fit = fit_all(synthetic("tcp", LinkCost(100.0, 1.0), 4, call=300.0))
    assert fit.phase_us == 0.0
    assert fit.links["tcp"].cost.alpha_us == pytest.approx(200.0, rel=1e-6)
    assert fit.links["tcp"].max_error < 1e-9


def test_noisy_timings_stay_close_and_report_the_error():
    truth = LinkCost(300.0, 0.12)
    fit = fit_all(synthetic("tcp", truth, 8, noise=0.05) + synthetic("tcp", truth, 2, noise=0.05))
    assert fit.links["tcp"].cost.alpha_us == pytest.approx(truth.alpha_us, rel=0.15)
    assert fit.links["tcp"].cost.gbps == pytest.approx(truth.gbps, rel=0.1)
    assert 0.01 < fit.links["tcp"].max_error < 0.12  # the ripple shows up as fit error


def test_negative_terms_are_pinned_at_zero():
    # Times that fall under the bytes line at small sizes would fit alpha < 0.
    samples = [Sample("copy", 1, b, b * 1e-4 * (0.5 if b < 8192 else 1.0)) for b in SIZES]
    fit = fit_all(samples)
    assert fit.links["copy"].cost.alpha_us == 0.0
    assert 10.0 <= fit.links["copy"].cost.gbps <= 20.0  # between the two lines the samples lie on
    assert fit.links["copy"].max_error > 0.1


def test_one_size_cannot_separate_alpha_from_bandwidth():
    with pytest.raises(ValueError, match="tcp: the samples do not separate"):
        fit_all([Sample("tcp", 3, 1024, 50.0), Sample("tcp", 3, 1024, 51.0)])
