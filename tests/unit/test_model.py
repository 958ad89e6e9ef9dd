"""The cost model against predictions computed by hand, and profiles."""

from __future__ import annotations

import json

import pytest

from alltoall.plan import LinkCost, Profile, plan
from alltoall.plan import profile as profiles

# shm: 2 us + 0.25 ns/B; tcp: 10 us + 1 ns/B; copy: 1 us per pass + 0.5 ns/B.
PROFILE = Profile(
    links={"shm": LinkCost(2.0, 4.0), "tcp": LinkCost(10.0, 1.0)},
    copy=LinkCost(1.0, 2.0),
    intra_node="shm",
    inter_node="tcp",
    name="hand",
)
B = 8192  # bytes per rank; 8 ranks in 2 nodes of 4: 1024 B blocks


def test_flat_by_hand():
    # One world phase: 3 peers on this node (shm), 4 on the other (tcp), 1024 B each.
    expected = (3 * 2 + 3 * 1024 * 0.25e-3) + (4 * 10 + 4 * 1024 * 1e-3)
    got = plan(8, 4, "flat").predict(B, PROFILE)
    assert got.time_us == pytest.approx(expected)
    assert got.by_link() == pytest.approx({"shm": 6.768, "tcp": 44.096})


def test_hierarchical_by_hand():
    # Reorder (8 KiB copy), 3 shm messages of 2 blocks, reorder, 1 tcp message
    # of 4 blocks; consecutive nodes need no final reorder.
    copy = 1 + 8192 * 0.5e-3
    expected = copy + (3 * 2 + 3 * 2048 * 0.25e-3) + copy + (10 + 4096 * 1e-3)
    got = plan(8, 4, "hierarchical").predict(B, PROFILE)
    assert got.time_us == pytest.approx(expected)
    assert [c.link for c in got.costs] == ["copy", "shm", "copy", "tcp"]


def test_coordinated_by_hand():
    # tp=2: take chunks (4 KiB), expert phase over ranks 0,2,4,6 (one shm, two
    # tcp messages of 1 KiB), all-gather with rank 1 (shm, 4 KiB), gather
    # chunks (8 KiB).
    expected = ((1 + 4096 * 0.5e-3) + (2 + 1024 * 0.25e-3) + (2 * 10 + 2048 * 1e-3)
                + (2 + 4096 * 0.25e-3) + (1 + 8192 * 0.5e-3))
    assert plan(8, 4, "coordinated", tp=2).predict(B, PROFILE).time_us == pytest.approx(expected)


def test_explicit_links_and_emulated_nodes():
    # Links given per phase override the profile's node classes; without
    # splitting by node every message of the phase costs its class.
    from alltoall.plan import predict_plan

    summary = plan(8, 4, "flat")
    everything_tcp = 7 * 10 + 7 * 1024 * 1e-3
    got = predict_plan(summary.raw, summary.node_of_rank, B, PROFILE, ["tcp"], split_by_node=False)
    assert got.time_us == pytest.approx(everything_tcp)
    with pytest.raises(ValueError, match="has 2 entries for a flat plan of 1 phases"):
        summary.predict(B, PROFILE, ["tcp", "shm"])
    with pytest.raises(ValueError, match="no link class 'net'"):
        summary.predict(B, PROFILE, ["net"])


def test_one_rank_copies_its_buffer():
    got = plan(1, 1, "flat").predict(4096, PROFILE)
    assert got.time_us == pytest.approx(1 + 4096 * 0.5e-3)


def test_shipped_a100_profile_reproduces_its_published_points():
    # NCCL 2.17 AllToAll on A100 NDmv4 (reference/ANCHORS.md): 9.34 us and
    # 49.75 us at 1 KB on 1x8 and 2x8; busbw 254.7 and 37.8 GB/s at 1 GB.
    a100 = profiles.load("a100-ndmv4")
    assert plan(8, 8, "flat").predict(1024, a100).time_us == pytest.approx(9.34, rel=1e-3)
    assert plan(16, 8, "flat").predict(1024, a100).time_us == pytest.approx(49.75, rel=1e-3)
    gib = 1 << 30
    for n, busbw in ((8, 254.7), (16, 37.8)):
        t = plan(n, 8, "flat").predict(gib, a100).time_us
        assert gib / (t * 1e3) * (n - 1) / n == pytest.approx(busbw, rel=1e-3)
    assert a100.sources and all("reference/" in s or "assumption" in s for s in a100.sources)


def test_paper_latency_claim_direction():
    # 128 GPUs, 8-way TP: the coordinated exchange's messages drop from 127 to
    # 15 + 7; its latency-bound time drops accordingly.
    a100 = profiles.load("a100-ndmv4")
    flat, coord = plan(128, 8, "flat"), plan(128, 8, "coordinated", tp=8)
    assert flat.messages == 127 and coord.messages == 15 + 7
    assert coord.predict(1024, a100).time_us < flat.predict(1024, a100).time_us / 4


def test_profile_json_round_trip_and_hash(tmp_path):
    path = tmp_path / "p.json"
    PROFILE.save(path)
    again = profiles.load(path)
    assert again == PROFILE and again.hash == PROFILE.hash
    doc = json.loads(path.read_text())
    doc["name"] = "renamed"
    path.write_text(json.dumps(doc))
    assert profiles.load(path).hash == PROFILE.hash  # names do not steer predictions
    doc["links"]["tcp"]["alpha_us"] = 11.0
    path.write_text(json.dumps(doc))
    assert profiles.load(path).hash != PROFILE.hash


def test_bad_profiles_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="inter_node='net' has no entry"):
        Profile(links={"tcp": LinkCost(1, 1)}, copy=LinkCost(1, 1), intra_node="tcp", inter_node="net")
    with pytest.raises(ValueError, match="unknown link classes"):
        Profile(links={"ib": LinkCost(1, 1)}, copy=LinkCost(1, 1), intra_node="ib", inter_node="ib")
    with pytest.raises(ValueError, match="gbps must be > 0"):
        LinkCost(1.0, 0.0)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        profiles.load(bad)
    with pytest.raises(ValueError, match="no such file, and not a shipped profile"):
        profiles.load(tmp_path / "missing.json")


def test_active_profile_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(profiles.PROFILE_ENV, raising=False)
    assert profiles.active() is None  # nothing calibrated yet
    PROFILE.save(profiles.default_path())
    assert profiles.active() == PROFILE
    monkeypatch.setenv(profiles.PROFILE_ENV, "off")
    assert profiles.active() is None
    monkeypatch.setenv(profiles.PROFILE_ENV, "a100-ndmv4")
    assert profiles.active().name == "a100-ndmv4"
    assert profiles.output_path() == profiles.default_path()  # a shipped name is not overwritten
    monkeypatch.setenv(profiles.PROFILE_ENV, str(tmp_path / "mine.json"))
    assert profiles.output_path() == tmp_path / "mine.json"


def test_phase_cost_by_hand():
    with_phase = {k: LinkCost(v.alpha_us, v.gbps, phase_us=50.0 if k == "tcp" else 20.0)
                  for k, v in PROFILE.links.items()}
    per_phase = Profile(links=with_phase, copy=PROFILE.copy, intra_node="shm", inter_node="tcp")
    # Flat's one phase is a tcp phase (it spans nodes): tcp's phase cost once.
    assert plan(8, 4, "flat").predict(B, per_phase).time_us == pytest.approx(50.0 + 6.768 + 44.096)
    # Hierarchical: a shm phase (node) and a tcp phase (rail).
    hierarchical = plan(8, 4, "hierarchical")
    assert hierarchical.predict(B, per_phase).time_us == pytest.approx(70.0 + hierarchical.predict(B, PROFILE).time_us)
    assert plan(8, 8, "hierarchical").predict(B, per_phase).time_us == pytest.approx(
        20.0 + plan(8, 8, "hierarchical").predict(B, PROFILE).time_us)  # one node: one shm phase
    assert per_phase.hash != PROFILE.hash


def test_protocol_threshold_by_hand():
    # shm: 0.25 ns/B below 4 KiB messages, 0.1 ns/B (10 GB/s) from 4 KiB on.
    two = Profile(links={"shm": LinkCost(2.0, 4.0, large_bytes=4096, large_gbps=10.0), "tcp": LinkCost(10.0, 1.0)},
                  copy=PROFILE.copy, intra_node="shm", inter_node="shm")
    flat = plan(8, 8, "flat")  # 7 messages of b/8
    assert flat.predict(8 * 4095, two).time_us == pytest.approx(7 * 2 + 7 * 4095 * 0.25e-3)
    assert flat.predict(8 * 4096, two).time_us == pytest.approx(7 * 2 + 7 * 4096 * 0.1e-3)
    from alltoall.plan.model import breakpoints

    assert breakpoints(flat.raw, two) == (8 * 4096,)
    # Hierarchical on 2 nodes of 4: node messages carry 2 of 8 blocks, the rail message 4.
    assert breakpoints(plan(8, 4, "hierarchical").raw, two) == (8 * 4096 / 4, 8 * 4096 / 2)
    assert breakpoints(flat.raw, PROFILE) == ()
    # The new fields survive a round trip and count in the hash.
    again = Profile.from_json(two.to_json())
    assert again == two and again.hash == two.hash
    assert two.hash != Profile.from_json({**two.to_json(), "links": {**two.to_json()["links"], "shm": {
        "alpha_us": 2.0, "gbps": 4.0, "large_bytes": 8192, "large_gbps": 10.0}}}).hash


def test_profile_wide_phase_cost_is_refused():
    doc = {**PROFILE.to_json(), "phase_us": 5.0}
    with pytest.raises(ValueError, match="profile-wide phase_us is no longer read"):
        Profile.from_json(doc)


def test_auto_follows_the_piecewise_prediction_across_thresholds():
    # Shared memory 4x faster per byte from 16 KiB messages on: flat's
    # messages (b/8) cross it at 128 KiB per rank, hierarchical's node and
    # rail messages (b/4, b/2) at 64 and 32 KiB. The selector's lines must
    # give the algorithm the full prediction ranks fastest, at every size
    # around the breakpoints, not only at the ends.
    from alltoall.ops.selection import ModelSelector
    from alltoall.topology import Topology

    shm = LinkCost(5.0, 0.5, phase_us=40.0, large_bytes=16384, large_gbps=2.0)
    profile = Profile(links={"shm": shm}, copy=LinkCost(1.0, 100.0), intra_node="shm", inter_node="shm")
    topology = Topology.emulate(8, 4, 0)
    links = [{"flat": ("shm",), "hierarchical": ("shm", "shm")}] * 8
    selector = ModelSelector(profile, topology, links, ("flat", "hierarchical"))
    picks = set()
    for _ in range(2):  # the second pass answers from the choices remembered per size: they must agree
        for size in sorted({int(b * f) for b in (8192, 32768, 65536, 131072, 1 << 20)
                            for f in (0.5, 0.99, 1, 1.01, 2)}):
            size -= size % 64  # a whole number of bytes per peer
            full = selector.predict_us(size)
            pick = selector.choose(size // 8)
            assert full[pick] == pytest.approx(min(full.values()), rel=1e-9), (size, full, pick)
            picks.add(pick)
    assert picks == {"flat", "hierarchical"}  # hierarchical wins where only its messages are large


def test_an_overlapping_class_costs_the_larger_of_fixed_and_bytes():
    # tcp overlapped: 50 us per phase and 10 us per message against 1 ns/B.
    # Flat on 2 nodes of 4: 4 tcp messages of b/8, 3 shm ones (summed as before).
    from dataclasses import replace

    from alltoall.plan.model import breakpoints

    tcp = LinkCost(10.0, 1.0, phase_us=50.0, overlap=True)
    over = replace(PROFILE, links={**PROFILE.links, "tcp": tcp})
    flat = plan(8, 4, "flat")
    for size in (B, 1 << 20):
        block = size / 8
        shm = 3 * 2 + 3 * block * 0.25e-3
        expected = shm + max(50 + 4 * 10, 4 * block * 1e-3)
        assert flat.predict(size, over).time_us == pytest.approx(expected), size
    # The knee: 4 * (b/8) * 1e-3 us == 90 us at b = 180,000 B, where the slope changes.
    assert 180_000 in [round(b) for b in breakpoints(flat.raw, over, flat.node_of_rank)]
    assert breakpoints(flat.raw, over) == ()  # without the nodes, no knee is placed
    assert tcp == LinkCost.from_json(tcp.to_json()) and tcp.to_json()["overlap"] is True
    assert "overlap" not in LinkCost(1.0, 1.0).to_json()
    with pytest.raises(ValueError, match="overlap must be true or false"):
        LinkCost.from_json({"alpha_us": 1, "gbps": 1, "overlap": "yes"})


def test_auto_follows_an_overlapping_class_across_its_knee():
    from alltoall.ops.selection import ModelSelector
    from alltoall.topology import Topology

    tcp = LinkCost(200.0, 0.05, phase_us=300.0, overlap=True)
    profile = Profile(links={"shm": LinkCost(5.0, 0.5, phase_us=40.0), "tcp": tcp}, copy=LinkCost(1.0, 0.2),
                      intra_node="shm", inter_node="tcp")
    topology = Topology.emulate(8, 4, 0)
    links = [{"flat": ("tcp",), "hierarchical": ("shm", "tcp")}] * 8
    selector = ModelSelector(profile, topology, links, ("flat", "hierarchical"))
    picks = set()
    for size in [1024 * 2**i for i in range(13)]:
        full = selector.predict_us(size)
        pick = selector.choose(size // 8)
        assert full[pick] == pytest.approx(min(full.values()), rel=1e-9), (size, full, pick)
        picks.add(pick)
    assert picks == {"flat", "hierarchical"}
