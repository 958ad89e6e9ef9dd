"""alltoall-bench's pure parts, in one process: sizes, traffic matrices, the
hashed-input check against a simulated exchange, and the report formats
(the table parses back, the JSON validates against docs/bench.schema.json)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from alltoall.cli import bench_check, bench_report, bench_traffic
from alltoall.cli.bench_run import Measurement, Progress

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "bench.schema.json"


@pytest.mark.parametrize("text,expected", [("4096", 4096), ("1K", 1024), ("4M", 4 << 20), ("1G", 1 << 30),
                                           ("64KB", 64 << 10), ("2KiB", 2048), ("8k", 8192)])
def test_parse_size(text, expected):
    assert bench_traffic.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "1.5M", "-4", "4X"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a byte count"):
        bench_traffic.parse_size(text)


def test_parse_dtype_accepts_nccl_and_torch_names():
    assert bench_traffic.parse_dtype("float") == ("float", torch.float32)
    assert bench_traffic.parse_dtype("bf16") == ("bfloat16", torch.bfloat16)
    with pytest.raises(ValueError, match="'complex' is not one of"):
        bench_traffic.parse_dtype("complex")


def test_size_sweep_rounds_to_whole_elements_per_peer():
    # 8 ranks of float: sizes are multiples of 32 bytes, at least one element per peer.
    assert bench_traffic.size_sweep(16, 1024, 4, 8, 4) == [32, 64, 256, 1024]
    assert bench_traffic.size_sweep(1000, 1000, 2, 3, 4) == [996]
    with pytest.raises(ValueError, match="step factor must be >= 2"):
        bench_traffic.size_sweep(1024, 4096, 1, 4, 4)


@pytest.mark.parametrize("spec", ["uniform", "zipf:0", "zipf:1.5"])
@pytest.mark.parametrize("world", [1, 3, 8])
def test_traffic_rows_sum_to_the_size(spec, world):
    matrix = bench_traffic.traffic_matrix(bench_traffic.parse_splits(spec), world, 1001, seed=3)
    assert len(matrix) == world and all(len(row) == world for row in matrix)
    assert [sum(row) for row in matrix] == [1001] * world
    assert all(c >= 0 for row in matrix for c in row)


def test_zipf_sends_most_to_the_same_hot_rank():
    matrix = bench_traffic.traffic_matrix(bench_traffic.parse_splits("zipf:2"), 8, 8000, seed=0)
    hot = [row.index(max(row)) for row in matrix]
    assert len(set(hot)) == 1
    assert bench_traffic.receive_imbalance(matrix) > 4


def test_weight_file(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("# rows: sources\n1, 0, 1\n0 1 0\n0 0 0\n")
    spec = bench_traffic.parse_splits(str(path))
    assert bench_traffic.traffic_matrix(spec, 3, 10, seed=0) == [[5, 0, 5], [0, 10, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="3x3 matrix but the world has 4"):
        bench_traffic.traffic_matrix(spec, 4, 10, seed=0)
    path.write_text("1 2\n3\n")
    with pytest.raises(ValueError, match="square matrix"):
        bench_traffic.parse_splits(str(path))
    with pytest.raises(ValueError, match="neither 'uniform'"):
        bench_traffic.parse_splits(str(tmp_path / "missing"))


def _simulate_exchange(inputs: list[torch.Tensor], matrix: list[list[int]], dest: int) -> torch.Tensor:
    """What ``dest`` receives from a correct all-to-all-v, by slicing."""
    parts = []
    for s, x in enumerate(inputs):
        start = sum(matrix[s][:dest])
        parts.append(x[start:start + matrix[s][dest]])
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", list(bench_traffic.DTYPES.values()))
@pytest.mark.parametrize("spec", ["uniform", "zipf:1.2"])
def test_expected_output_matches_a_simulated_exchange(dtype, spec):
    world, seed = 5, 11
    matrix = bench_traffic.traffic_matrix(bench_traffic.parse_splits(spec), world, 37 * world, seed)
    cpu = torch.device("cpu")
    inputs = [bench_check.make_input(seed, s, sum(matrix[s]), dtype, cpu) for s in range(world)]
    for dest in range(world):
        received = _simulate_exchange(inputs, matrix, dest)
        expected = bench_check.expected_output(seed, dest, matrix, dtype, cpu)
        assert bench_check.count_wrong(received, expected) == 0
        assert bench_check.count_wrong(bench_check.corrupt(received), expected) == 1
    # The data identify their source and position: another seed or a swapped block is caught.
    other = bench_check.expected_output(seed + 1, 0, matrix, dtype, cpu)
    assert bench_check.count_wrong(_simulate_exchange(inputs, matrix, 0), other) > 0


def test_hashed_values_differ_by_source_and_index():
    index = torch.arange(4096)
    a = bench_check.element_hash(0, 0, index)
    assert a.unique().numel() == 4096
    assert (a != bench_check.element_hash(0, 1, index)).float().mean() > 0.99
    assert int(a.min()) >= 0 and int(a.max()) < 2**32


def test_wrong_shape_counts_everything():
    expected = torch.arange(6, dtype=torch.float32)
    assert bench_check.count_wrong(expected[:4], expected) == 6


def _run(rows: list[Measurement], skipped: dict[str, str] | None = None) -> bench_report.BenchRun:
    return bench_report.BenchRun(
        argv=["alltoall-bench"], world_size=4, launcher="self", backend="gloo", device="cpu",
        topology="4 ranks on 2 node(s) x 2 rank(s), emulated placement", local_size=2, tp=1, build=["b"],
        dtype="float", element_size=4, splits="uniform", receive_imbalance=1.0, iterations=2, rounds=1, warmup=1,
        checks=1, seed=0, threads=1, algorithms={n: n for n in dict.fromkeys(r.algorithm for r in rows)},
        skipped=skipped or {}, rows=rows)


def _rows() -> list[Measurement]:
    return [Measurement(name, size, size // 16, t, t, t, wrong, 4)
            for name, factor, wrong in (("flat", 1.0, 0), ("torch", 2.0, 0), ("hierarchical", 4.0, 3))
            for size, t in ((1024, 100.0 * factor), (4096, 400.0 * factor))]


def test_table_parses_back_and_bandwidths_follow_nccl_tests():
    run = _run(_rows())
    tables = bench_report.parse_table(bench_report.report_text(run))
    assert set(tables) == {"flat", "torch", "hierarchical"}
    flat = tables["flat"]
    assert [r["size"] for r in flat] == [1024, 4096]
    assert flat[0]["count"] == 64 and flat[0]["type"] == "float"
    # 1024 B in 100 us = 0.01024 GB/s; busbw = algbw * 3/4.
    assert flat[0]["algbw"] == pytest.approx(0.0102, abs=1e-4)
    assert flat[0]["busbw"] == pytest.approx(0.0077, abs=1e-4)
    assert [r["wrong"] for r in tables["hierarchical"]] == [3, 3]


def test_summary_speedups_against_torch():
    run = _run(_rows())
    assert run.speedups()["flat"] == {1024: 2.0, 4096: 2.0}
    assert run.speedups()["hierarchical"] == {1024: 0.5, 4096: 0.5}
    text = "\n".join(bench_report.summary_lines(run))
    assert "2.000x" in text and "0.500x" in text and "Wrong elements: 6 FAILED" in text


def test_json_validates_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    document = bench_report.to_json(_run(_rows(), skipped={"mpi": "not under mpiexec"}))
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    # The schema is not vacuous: a row without its time, or a skipped entry with results, fails.
    broken = json.loads(json.dumps(document))
    del broken["algorithms"][0]["results"][0]["time_us"]
    with pytest.raises(jsonschema.ValidationError, match="time_us"):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)
    broken = json.loads(json.dumps(document))
    broken["algorithms"][-1]["results"] = document["algorithms"][0]["results"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream,drawn", [(_Terminal, True), (io.StringIO, False)], ids=["tty", "pipe"])
def test_progress_bar_only_on_a_terminal(monkeypatch, stream, drawn):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    bar = Progress(total=4, enabled=True)
    bar.step("1024 B")
    bar.step("2048 B")
    bar.close()
    assert ("2/4 2048 B" in err.getvalue()) == drawn
    if not drawn:
        assert err.getvalue() == ""
