"""The calibration's fit on synthetic timings: it recovers known phase cost,
alpha and bandwidths (one per protocol) per link class, and the copy rate."""

from __future__ import annotations

import math

import pytest

from alltoall.cli.calibrate_fit import Sample, fit_all
from alltoall.plan import LinkCost

SIZES = [1024 * 4**i for i in range(7)]  # the sweep's sizes, bytes per rank


def synthetic(link: str, cost: LinkCost, group: int, noise: float = 0.0) -> list[Sample]:
    """Flat exchanges on groups of ``group`` ranks, as the sweep times them;
    a deterministic +-noise ripple."""
    out = []
    for i, b in enumerate(SIZES):
        sent, each = b * (group - 1) / group, b / group
        ripple = 1 + noise * math.sin(1.7 * i + group)
        out.append(Sample(link, group - 1, sent, (cost.phase_us + cost.time_us(group - 1, sent, each)) * ripple, each))
    return out


def copies(cost: LinkCost) -> list[Sample]:
    return [Sample("copy", 1, b, cost.time_us(1, b)) for b in SIZES]


def close(got: LinkCost, truth: LinkCost, rel: float) -> None:
    assert got.phase_us == pytest.approx(truth.phase_us, rel=rel, abs=1e-6)
    assert got.alpha_us == pytest.approx(truth.alpha_us, rel=rel, abs=1e-6)
    assert got.gbps == pytest.approx(truth.gbps, rel=rel)
    assert got.large_bytes == truth.large_bytes
    if truth.large_gbps is None:
        assert got.large_gbps is None
    else:
        assert got.large_gbps == pytest.approx(truth.large_gbps, rel=rel)


def test_recovers_phase_alpha_and_both_bandwidths_exactly():
    # The world (8), node groups (4) and rail groups (2) of 8 ranks as 2x4.
    tcp = LinkCost(180.0, 0.35, phase_us=900.0)
    shm = LinkCost(12.0, 2.5, phase_us=300.0, large_bytes=65536, large_gbps=6.0)
    copy = LinkCost(3.0, 4.0)
    samples = [s for k in (8, 4, 2) for s in synthetic("tcp", tcp, k) + synthetic("shm", shm, k)] + copies(copy)
    fit = fit_all(samples, {"shm": 65536})
    assert set(fit.links) == {"copy", "shm", "tcp"}
    for link, truth in (("tcp", tcp), ("shm", shm), ("copy", copy)):
        close(fit.links[link].cost, truth, 1e-6)
        assert fit.links[link].max_error < 1e-9
    assert fit.links["tcp"].samples == 3 * len(SIZES)


def test_one_protocol_when_too_few_sizes_reach_the_threshold():
    # Threshold above every message but the largest: one size cannot fit a
    # bandwidth, so the class keeps one.
    shm = LinkCost(12.0, 2.5, phase_us=300.0)
    samples = synthetic("shm", shm, 8) + synthetic("shm", shm, 2)
    fit = fit_all(samples, {"shm": SIZES[-1] // 2})
    close(fit.links["shm"].cost, shm, 1e-6)


def test_one_group_size_folds_the_phase_into_alpha():
    # Groups of 4 only: phase and 3 alphas cannot be told apart, so phase = 0
    # and alpha carries phase / 3; the fitted samples are still exact.
    fit = fit_all(synthetic("tcp", LinkCost(100.0, 1.0, phase_us=300.0), 4))
    assert fit.links["tcp"].cost.phase_us == 0.0
    assert fit.links["tcp"].cost.alpha_us == pytest.approx(200.0, rel=1e-6)
    assert fit.links["tcp"].max_error < 1e-9


def test_noisy_timings_stay_close_and_report_the_error():
    truth = LinkCost(300.0, 0.12, phase_us=500.0)
    fit = fit_all(synthetic("tcp", truth, 8, noise=0.05) + synthetic("tcp", truth, 4, noise=0.05)
                  + synthetic("tcp", truth, 2, noise=0.05))
    got = fit.links["tcp"].cost
    assert got.phase_us + 7 * got.alpha_us == pytest.approx(truth.phase_us + 7 * truth.alpha_us, rel=0.1)
    assert got.gbps == pytest.approx(truth.gbps, rel=0.1)
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
