"""--calibrate and the model section of alltoall-bench end to end at tiny
sizes; alltoall-model; --plot without matplotlib fails at once."""

from __future__ import annotations

import json
import sys

from alltoall.plan import profile as profiles
from tests.cli.test_bench_cli import TINY, bench, run_cli, validate

NO_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = None; "
                 "from {module} import main; raise SystemExit(main({argv}))")


def test_calibrate_then_bench_with_the_profile(tmp_path):
    path = tmp_path / "profile.json"
    cal = run_cli(bench("--nprocs", "4", "--local-size", "2", "--calibrate", "--profile", str(path)))
    assert cal.returncode == 0, f"{cal.stdout}\n{cal.stderr}"
    profile = profiles.load(path)
    # One host: the default transport is shared memory, c10d over gloo is "loopback".
    assert set(profile.links) == {"shm", "loopback"} and profile.intra_node == profile.inter_node == "shm"
    assert profile.links["shm"].gbps > 0 and profile.links["shm"].phase_us >= 0
    loopback = profile.links["loopback"]
    assert loopback.gbps > 0 and profile.copy.gbps > 0 and loopback.phase_us >= 0
    # Shared memory switches to single copy at 64 KiB messages (the transport's
    # default), and the sweep has three sizes above it: two bandwidths.
    assert profile.links["shm"].large_bytes == 65536 and profile.links["shm"].large_gbps > 0
    # A second byte cost and overlap are tried for "tcp" only (between hosts): none here.
    assert loopback.large_bytes == 0 and not loopback.overlap
    assert profile.fit["plans"]["tcp_large_bytes"] == 0 and profile.fit["plans"]["tcp_overlap"] is False
    assert f"hash {profile.hash}" in cal.stdout and f"wrote profile: {path}" in cal.stdout
    fitted = [line for line in cal.stdout.splitlines() if line.split()[1:2] in (["shm"], ["loopback"], ["copy"])]
    # Fit lines for shm, tcp and copy (first stage, then refitted); 7 sizes on the
    # world, the node groups and the rail groups over both transports, and 15
    # of copies (1 KiB to 16 MiB).
    assert len(fitted) == 3 + 3 + 3 * 2 * 7 + 15, cal.stdout
    assert profile.fit is not None and 0 <= profile.fit["loopback"]["max_relative_error"]
    # The refit: flat and hierarchical on the world over both transports, 7 sizes each.
    plans = [line for line in cal.stdout.splitlines() if line.split()[1:2] in (["flat"], ["hierarchical"])]
    assert len(plans) == 2 * 2 * 7 and profile.fit["plans"]["samples"] == 2 * 2 * 7, cal.stdout
    assert 0 <= profile.fit["plans"]["mean_relative_error"] <= profile.fit["plans"]["max_relative_error"]

    out = tmp_path / "run.json"
    run = run_cli(bench("--nprocs", "4", "--local-size", "2", *TINY, "--algorithms", "flat,hierarchical,auto",
                        "--profile", str(path), "--json", str(out)))
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert f"# Model: profile calibrated (hash {profile.hash})" in run.stdout
    assert "# Worst |err|" in run.stdout
    document = json.loads(out.read_text())
    validate(document)
    model = document["model"]
    assert set(model["auto_choice"]) == {"auto"} and set(model["auto_choice"]["auto"]) == {"1024", "4096"}
    assert {(p["algorithm"], p["size_bytes"]) for p in model["predictions"]} == {
        (a, s) for a in ("flat", "hierarchical", "auto") for s in (1024, 4096)}
    assert all(p["predicted_us"] > 0 and p["measured_us"] > 0 for p in model["predictions"])


def test_calibrate_first_sweeps_with_the_profile_it_just_wrote(tmp_path):
    path = tmp_path / "fresh" / "profile.json"
    out = tmp_path / "run.json"
    run = run_cli(bench("--nprocs", "4", "--local-size", "2", *TINY, "--algorithms", "flat,hierarchical,auto",
                        "--calibrate-first", "--profile", str(path), "--json", str(out)))
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    profile = profiles.load(path)
    assert profile.fit is not None and profile.fit["plans"]["samples"] == 2 * 2 * 7
    # The calibration report comes first, then the sweep, whose model section
    # (read by every rank's Communicator) is the profile just written.
    assert run.stdout.index(f"wrote profile: {path}") < run.stdout.index("# alltoall-bench: all-to-all")
    assert f"# Model: profile calibrated (hash {profile.hash})" in run.stdout
    document = json.loads(out.read_text())
    validate(document)
    assert document["model"]["profile"] == f"calibrated (hash {profile.hash})"
    assert all(p["predicted_us"] > 0 and p["measured_us"] > 0 for p in document["model"]["predictions"])


def test_bench_without_a_profile_lists_autos_fixed_choice(tmp_path):
    run = run_cli(bench("--nprocs", "2", *TINY, "--algorithms", "flat", "--profile", "off"))
    assert run.returncode == 0, run.stderr
    assert "# auto (no cost profile: the fixed rule of alltoall/ops/selection.py) chose:" in run.stdout
    assert "#       1024            flat" in run.stdout
    assert "alltoall 0.1.0\n" in run.stdout and " on " not in run.stdout.splitlines()[4]  # no path, no host


def test_model_cli_table_and_json(tmp_path):
    out = tmp_path / "m.json"
    result = run_cli([sys.executable, "-m", "alltoall.cli.model", "--gpus", "8,16,128", "-b", "1K", "-e", "1K",
                      "--tp", "2,8", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    assert "profile a100-ndmv4" in result.stdout
    rows = {int(line.split()[0]): line.split() for line in result.stdout.splitlines()
            if line.strip() and not line.startswith("#")}
    assert set(rows) == {8, 16, 128}
    doc = json.loads(out.read_text())
    at = {(p["gpus"], p["algorithm"]): p["predicted_us"] for p in doc["predictions"]}
    assert at[(128, "coord tp8")] < at[(128, "hierarchical")] < at[(128, "flat")]
    assert at[(8, "flat")] == at[(8, "hierarchical")]  # one node: the same single phase
    assert rows[128][-2] == "tp8" and rows[128][-3] == "coord"  # best column names it


def test_model_cli_rejects_a_missing_profile(tmp_path):
    result = run_cli([sys.executable, "-m", "alltoall.cli.model", "--profile", str(tmp_path / "nope.json")])
    assert result.returncode == 2 and "no such file, and not a shipped profile" in result.stderr


def test_plot_without_matplotlib_fails_at_once(tmp_path):
    png = str(tmp_path / "x.png")
    for module, argv in (("alltoall.cli.bench", ["--nprocs", "2", "--plot", png]),
                         ("alltoall.cli.model", ["--plot", png])):
        result = run_cli([sys.executable, "-c", NO_MATPLOTLIB.format(module=module, argv=argv)])
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--plot needs matplotlib" in lines[0], result.stderr
        assert result.stdout == ""  # nothing ran
