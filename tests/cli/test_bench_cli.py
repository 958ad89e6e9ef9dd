"""alltoall-bench end to end at tiny sizes: self-launched, under torchrun and
under mpiexec. The table parses, every check passes, the corruption hook is
caught (rows and exit status), and --json validates against its schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alltoall.cli.bench import EXIT_WRONG, main
from alltoall.cli.bench_check import CORRUPT_ENV
from alltoall.cli.bench_report import parse_table

BIN = Path(sys.executable).parent
SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "bench.schema.json"
TINY = ["-b", "1K", "-e", "4K", "-f", "4", "-n", "2", "-w", "1", "--no-progress"]
DEADLINE_S = 120

# A launcher's variables in the test's own environment would change how the
# CLI starts, so every run begins without them.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "PMI_RANK",
               "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_USE_AGENT_STORE",
               "ALLTOALL_BENCH_SELF_LAUNCHED", "ALLTOALL_LOCAL_SIZE", CORRUPT_ENV)


def run_cli(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    clean.update(env or {})
    # A session of its own, so a run past its deadline is killed with every rank it started.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean,
                          cwd=BIN.parent, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{command} did not finish in {DEADLINE_S} s\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "alltoall.bench", *args]


def assert_all_correct(result: subprocess.CompletedProcess, algorithms: set[str], sizes: int) -> dict:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    tables = parse_table(result.stdout)
    assert set(tables) == algorithms, result.stdout
    for name, rows in tables.items():
        assert len(rows) == sizes, f"{name}: {rows}"
        assert all(r["wrong"] == 0 for r in rows), f"{name}: {rows}"
        assert all(r["time_us"] > 0 and r["busbw"] <= r["algbw"] for r in rows), f"{name}: {rows}"
    assert "Wrong elements: 0 OK" in result.stdout
    return tables


def validate(document: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra")
    jsonschema.validate(document, json.loads(SCHEMA.read_text()), cls=jsonschema.Draft202012Validator)


def test_torch_through_the_alltoall_backend(tmp_path):
    """--backend alltoall: the torch baseline is dist.all_to_all_single on an
    "alltoall" default group, timed against the Communicator's "auto"."""
    result = run_cli(bench("--nprocs", "4", "--local-size", "2", "--backend", "alltoall", "--algorithms",
                           "torch,auto", *TINY), env={"ALLTOALL_ALGORITHM": "hierarchical", "ALLTOALL_LOG": "1"})
    assert_all_correct(result, {"torch", "auto"}, sizes=2)
    assert "backend alltoall" in result.stdout
    # The default group's log: the backend's nodes are the bench's emulated ones.
    assert "alltoall backend: group '0', 4 ranks" in result.stderr
    assert "2 node(s) x 2 rank(s), emulated" in result.stderr
    assert "hierarchical [intra_node: shm, inter_node: shm]" in result.stderr


def test_self_launched_with_every_output(tmp_path):
    out = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "png", "txt")}
    result = run_cli([str(BIN / "alltoall-bench"), "--nprocs", "4", "--local-size", "2", *TINY,
                      "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"]),
                      "--table", str(out["txt"])])
    tables = assert_all_correct(result, {"flat", "hierarchical", "coordinated", "torch"}, sizes=2)
    assert tables["flat"][0]["size"] == 1024 and tables["flat"][0]["count"] == 64  # 1 KiB of float over 4 peers
    assert "launched by 4 local processes, backend gloo" in result.stdout
    assert "4 ranks on 2 node(s) x 2 rank(s)" in result.stdout
    assert "skipped mpi: runs only under mpiexec" in result.stdout
    assert "Speed-up against torch" in result.stdout

    document = json.loads(out["json"].read_text())
    validate(document)
    ran = {a["name"]: a for a in document["algorithms"] if a["status"] == "ran"}
    assert set(ran) == {"flat", "hierarchical", "coordinated", "torch"}
    assert [r["size_bytes"] for r in ran["flat"]["results"]] == [1024, 4096]
    assert document["wrong_total"] == 0 and document["world_size"] == 4 and document["launcher"] == "self"
    assert out["txt"].read_text() in result.stdout
    assert len(out["csv"].read_text().splitlines()) == 1 + 4 * 2
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corruption_hook_is_caught_in_that_algorithm_only(tmp_path):
    # Uneven (zipf) splits and bfloat16: the v paths and a dtype numpy lacks.
    path = tmp_path / "r.json"
    result = run_cli(bench("--nprocs", "4", "--local-size", "2", *TINY, "--splits", "zipf:1.5", "-d", "bf16",
                           "--algorithms", "flat,hierarchical,torch", "--json", str(path)),
                     env={CORRUPT_ENV: "hierarchical"})
    assert result.returncode == EXIT_WRONG, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    tables = parse_table(result.stdout)
    # One corrupted element per rank and check iteration: 4 ranks.
    assert [r["wrong"] for r in tables["hierarchical"]] == [4, 4]
    assert all(r["wrong"] == 0 for name in ("flat", "torch") for r in tables[name])
    assert "Wrong elements: 8 FAILED" in result.stdout
    assert "splits zipf:1.5 (busiest receiver gets" in result.stdout
    document = json.loads(path.read_text())
    validate(document)
    assert document["wrong_total"] == 8 and document["dtype"] == "bfloat16"


def test_coordinated_with_tensor_parallelism_is_checked(tmp_path):
    # tp 2: each TP group hashes one replicated buffer and every rank checks
    # its chunk of what the EP peers sent; the hook proves that check bites.
    ok = run_cli(bench("--nprocs", "4", "--local-size", "2", "--tp", "2", *TINY, "--algorithms", "coordinated,torch"))
    assert_all_correct(ok, {"coordinated", "torch"}, sizes=2)
    assert ", tp 2" in ok.stdout
    bad = run_cli(bench("--nprocs", "4", "--local-size", "2", "--tp", "2", *TINY, "--algorithms", "coordinated,torch"),
                  env={CORRUPT_ENV: "coordinated"})
    assert bad.returncode == EXIT_WRONG, bad.stdout
    assert [r["wrong"] for r in parse_table(bad.stdout)["coordinated"]] == [4, 4]
    uneven = run_cli(bench("--nprocs", "4", "--tp", "2", *TINY, "--splits", "zipf:1",
                           "--algorithms", "coordinated,flat"))
    assert_all_correct(uneven, {"flat"}, sizes=2)
    assert "skipped coordinated: times uniform splits only" in uneven.stdout


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun is not installed next to this python")
def test_under_torchrun():
    result = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "4", "-m", "alltoall.bench",
                      *TINY, "--algorithms", "flat,hierarchical,torch,mpi", "--local-size", "2"])
    assert_all_correct(result, {"flat", "hierarchical", "torch"}, sizes=2)
    assert "launched by torchrun" in result.stdout
    assert "skipped mpi: runs only under mpiexec with mpi4py (this run was launched by torchrun)" in result.stdout


@pytest.mark.mpi
@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="mpiexec is not installed (the mpi extra: MPICH)")
def test_under_mpiexec_runs_mpi_alltoall():
    for splits in ("uniform", "zipf:1"):
        result = run_cli([str(BIN / "mpiexec"), "-n", "4", sys.executable, "-m", "alltoall.bench", *TINY,
                          "--algorithms", "flat,torch,mpi", "--splits", splits])
        assert_all_correct(result, {"flat", "torch", "mpi"}, sizes=2)
        assert "launched by mpiexec (mpi4py)" in result.stdout


def test_not_under_a_launcher_needs_nprocs():
    result = run_cli(bench(*TINY))
    assert result.returncode == 2 and "not under a launcher: pass --nprocs N" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--nprocs", "4", "--tp", "3"], "--tp 3 does not divide the world size 4"),
    (["--nprocs", "4", "--local-size", "3"], "--local-size 3 does not divide the world size 4"),
    (["--nprocs", "2", "--algorithms", "flat,nccl"], "unknown ['nccl']"),
    (["--nprocs", "2", "-d", "complex"], "dtype 'complex' is not one of"),
    (["--nprocs", "2", "-b", "1.5K"], "'1.5K' is not a byte count"),
    (["--nprocs", "2", "--splits", str(SCHEMA)], "is not a row of numbers"),
])
def test_bad_flags_exit_2_before_any_rank_starts(capsys, monkeypatch, args, message):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
