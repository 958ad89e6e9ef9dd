"""The calibration's second stage (alltoall.cli.calibrate_refine): the whole
profile refitted on timed exchanges of whole plans. On timings the model
itself generates from a known profile, it reproduces them exactly from a
wrong starting profile, and it finds TCP's second byte cost."""

from __future__ import annotations

from dataclasses import replace

import pytest

from alltoall.cli.calibrate_refine import TCP_THRESHOLDS, PlanSample, refine
from alltoall.plan import LinkCost, Profile

SIZES = [1024 * 4**i for i in range(7)]  # the sweep's sizes, bytes per rank
TWO_BY_FOUR = tuple(r // 4 for r in range(8))


def truth(tcp_large: int = 0, overlap: bool = False) -> Profile:
    tcp = LinkCost(900.0, 0.1, phase_us=250.0, large_bytes=tcp_large, large_gbps=0.04 if tcp_large else None,
                   overlap=overlap)
    return Profile(links={"shm": LinkCost(150.0, 0.5, phase_us=100.0, large_bytes=65536, large_gbps=0.9),
                          "tcp": tcp},
                   copy=LinkCost(20.0, 2.0, large_bytes=1 << 21, large_gbps=1.0), intra_node="shm",
                   inter_node="tcp", name="truth")


def timed(profile: Profile, inter: str = "tcp", emulated: bool = False) -> list[PlanSample]:
    """Flat and hierarchical on 2 nodes of 4 (the inter-node phases on
    ``inter``), as the sweep times them, at the model's own prediction."""
    out = []
    for algorithm, links in (("flat", (inter,)), ("hierarchical", ("shm", inter))):
        for size in SIZES:
            sample = PlanSample(algorithm, TWO_BY_FOUR, 0, links, float(size), not emulated, 1.0)
            out.append(replace(sample, time_us=sample.predict_us(profile)))
    return out


def wrong_start(profile: Profile) -> Profile:
    """The same thresholds, every value off by a factor."""
    def off(c: LinkCost) -> LinkCost:
        return replace(c, alpha_us=c.alpha_us * 3 + 5, gbps=c.gbps / 4, phase_us=c.phase_us / 2,
                       large_gbps=None if c.large_gbps is None else c.large_gbps * 5)
    tcp = profile.links["tcp"]
    return replace(profile, links={"shm": off(profile.links["shm"]),
                                   "tcp": off(replace(tcp, large_bytes=0, large_gbps=None, overlap=False))},
                   copy=off(profile.copy), name="start")


@pytest.mark.parametrize("tcp_large,overlap", [(0, False), (256 * 1024, False), (0, True), (256 * 1024, True)])
def test_reproduces_the_models_own_timings(tcp_large, overlap):
    # With overlap, TCP's fixed costs hide its bytes up to a knee (at about
    # 1 MiB per rank here): the fit must find that the phase costs their
    # maximum, not their sum, and from a start that knows neither.
    samples = timed(truth(tcp_large, overlap))
    result = refine(wrong_start(truth(tcp_large, overlap)), samples)
    assert result.samples == len(samples)
    assert result.max_error < 1e-6, result
    assert result.tcp_threshold == tcp_large
    for s in samples:
        assert s.predict_us(result.profile) == pytest.approx(s.time_us, rel=1e-6)
    assert result.profile.links["tcp"].large_bytes == tcp_large
    assert result.tcp_overlap == overlap and result.to_json()["tcp_overlap"] == overlap


def test_the_first_stages_fit_is_worse_on_these_timings():
    samples = timed(truth(256 * 1024))
    start = wrong_start(truth(256 * 1024))
    before = max(abs(s.predict_us(start) - s.time_us) / s.time_us for s in samples)
    assert refine(start, samples).max_error < before / 100


def test_unexercised_classes_keep_their_values():
    # One host as 2 emulated nodes over shared memory only: "tcp" carries nothing.
    samples = timed(truth(), inter="shm", emulated=True)
    start = wrong_start(truth())
    result = refine(start, samples)
    assert result.profile.links["tcp"] == start.links["tcp"]
    assert result.tcp_threshold == 0 and result.max_error < 1e-6


def test_needs_two_samples():
    with pytest.raises(ValueError, match="at least two"):
        refine(truth(), timed(truth())[:1])


def test_thresholds_include_none():
    assert TCP_THRESHOLDS[0] == 0
