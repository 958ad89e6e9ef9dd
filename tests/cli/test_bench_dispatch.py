"""alltoall-bench dispatch end to end, small: every mode's row is there, no
wrong element, the files are written, and the row counters equal what the
test computes from the same drawn routing (replicate: one row per remote
assignment; dedup: one per distinct (token, remote node))."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from alltoall.cli.bench_dispatch import parse_table
from alltoall.cli.bench_routing import drawn_scores
from alltoall.moe.dispatch import route
from tests.cli.test_bench_cli import run_cli

WORLD, LOCAL, EXPERTS, K, SEED = 4, 2, 8, 4, 3
TOKENS = (16, 40)


def expected_inter_rows(tokens: int) -> dict[str, float]:
    """Mean over ranks of the rows one dispatch sends to other nodes."""
    node_of_expert = [(e // (EXPERTS // WORLD)) // LOCAL for e in range(EXPERTS)]
    replicate = dedup = 0
    for rank in range(WORLD):
        index = route(drawn_scores(tokens, EXPERTS, "uniform", 1.2, SEED, rank), K, None).expert_index
        mine = rank // LOCAL
        for row in index.tolist():
            remote = [node_of_expert[e] for e in row if node_of_expert[e] != mine]
            replicate += len(remote)
            dedup += len(set(remote))
    return {"replicate-flat": replicate / WORLD, "dedup": dedup / WORLD}


def test_dispatch_mode_small(tmp_path):
    out = {kind: tmp_path / f"d.{kind}" for kind in ("json", "csv", "png")}
    command = [sys.executable, "-m", "alltoall.bench", "dispatch", "--nprocs", str(WORLD), "--local-size", str(LOCAL),
               "-S", ",".join(map(str, TOKENS)), "-M", "16", "-k", str(K), "-E", str(EXPERTS), "-n", "1", "-w", "0",
               "--seed", str(SEED), "--json", str(out["json"]), "--csv", str(out["csv"])]
    if importlib.util.find_spec("matplotlib") is not None:
        command += ["--plot", str(out["png"])]
    result = run_cli(command)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    rows = parse_table(result.stdout)
    modes = ("replicate-flat", "replicate-hierarchical", "dedup", "auto")
    assert [(r["tokens"], r["mode"]) for r in rows] == [(s, m) for s in TOKENS for m in modes], result.stdout
    assert all(r["wrong"] == 0 for r in rows) and "Wrong elements: 0 OK" in result.stdout
    saved = json.loads(out["json"].read_text())
    assert saved["k"] == K and len(saved["rows"]) == len(rows)
    assert out["csv"].read_text().splitlines()[0].startswith("tokens,mode,resolved")
    if "--plot" in command:
        assert out["png"].stat().st_size > 0
    for tokens in TOKENS:
        expected = expected_inter_rows(tokens)
        by_mode = {r["mode"]: r for r in saved["rows"] if r["tokens"] == tokens}
        for mode, rows_inter in expected.items():
            assert by_mode[mode]["rows_inter"] == pytest.approx(rows_inter), (tokens, mode)
        assert by_mode["dedup"]["bytes_inter"] < by_mode["replicate-flat"]["bytes_inter"]


def test_bad_flags_exit_2():
    result = run_cli([sys.executable, "-m", "alltoall.bench", "dispatch", "--nprocs", "2", "-k", "9", "-E", "8"])
    assert result.returncode == 2 and "-k 9 must be in [1, -E 8]" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_megatron_row_on_the_same_routing_and_capacity():
    result = run_cli([sys.executable, "-m", "alltoall.bench", "dispatch", "--nprocs", "2", "-S", "12", "-M", "8",
                      "-k", "2", "-E", "4", "-n", "1", "-w", "0", "--capacity-factor", "1.0",
                      "--modes", "replicate-flat,megatron"])
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    rows = parse_table(result.stdout)
    assert [r["mode"] for r in rows] == ["replicate-flat", "megatron"] and all(r["wrong"] == 0 for r in rows)


def test_dispatch_mode_with_low_precision_wires(tmp_path):
    """FP8 dispatch and BF16 combine: no element off the wire-rounded result,
    and the bytes of the packed format per row (M=256: 1,024 bytes in fp32;
    in FP8 256 values and 2 scales of 4 bytes = 264)."""
    out = tmp_path / "d.json"
    base = [sys.executable, "-m", "alltoall.bench", "dispatch", "--nprocs", str(WORLD), "--local-size", str(LOCAL),
            "-S", "40", "-M", "256", "-k", str(K), "-E", str(EXPERTS), "-n", "1", "-w", "0", "--seed", str(SEED),
            "--modes", "dedup,replicate-flat"]
    result = run_cli([*base, "--dispatch-dtype", "fp8", "--combine-dtype", "bf16", "--json", str(out)])
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["wrong"] == 0 for r in rows), result.stdout
    by_mode = {r["mode"]: r for r in rows}
    replicate, dedup = by_mode["replicate-flat"], by_mode["dedup"]
    # replicate's rows carry their fp32 weight beside the packed token.
    assert replicate["bytes_inter"] == pytest.approx(replicate["rows_inter"] * (264 + 4)), replicate
    # dedup's hop-1 messages also carry each row's items (expert, weight).
    assert dedup["rows_inter"] * 264 <= dedup["bytes_inter"] < dedup["rows_inter"] * 1024, dedup
