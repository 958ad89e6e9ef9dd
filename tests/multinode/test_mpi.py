"""The core checks under ``mpiexec -n 4`` (MPICH and mpi4py from PyPI):
rank, size and local rank from MPI, the rendezvous address broadcast over
MPI, nodes of 2 ranks emulated on this one host."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import pytest

from alltoall.testing import launcher_free_environment
from tests.multinode.reports import ROOT, expected_counts, rank_checks_argv, read_reports

pytestmark = pytest.mark.mpi

RANKS, LOCAL_SIZE = 4, 2
DEADLINE_S = 240.0


def mpiexec() -> str | None:
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside_python if os.access(beside_python, os.X_OK) else shutil.which("mpiexec")


@pytest.mark.skipif(mpiexec() is None, reason="mpiexec not found (pip install mpich, or make install)")
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed (pip install mpi4py)")
def test_core_checks_under_mpiexec(tmp_path):
    argv = [mpiexec(), "-n", str(RANKS), *rank_checks_argv(tmp_path, "--local-size", str(LOCAL_SIZE))]
    proc = subprocess.Popen(argv, cwd=ROOT, env=launcher_free_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec still ran after {DEADLINE_S:.0f} s and was killed:\n{output.decode()[-4000:]}")
    reports = read_reports(tmp_path)
    errors = {r: rep["error"] for r, rep in reports.items() if rep["error"]}
    assert not errors, f"ranks failed: {errors}"
    assert proc.returncode == 0, output.decode()[-4000:]
    assert sorted(reports) == list(range(RANKS))
    addresses = {(rep["launch"]["master_addr"], rep["launch"]["master_port"]) for rep in reports.values()}
    assert len(addresses) == 1, f"ranks disagree on rank 0's address: {addresses}"
    assert next(iter(addresses))[0] == "127.0.0.1", "one host: the store is on loopback"
    for rank, rep in reports.items():
        assert rep["launch"]["launcher"] == "mpi"
        assert (rep["launch"]["rank"], rep["launch"]["world_size"]) == (rank, RANKS)
        assert rep["launch"]["local_rank"] == rank  # one host: the MPI shared-memory rank
        placement = rep["placements"]["launch"]
        assert placement["topology"]["node_of_rank"] == [r // LOCAL_SIZE for r in range(RANKS)]
        assert placement["topology"]["emulated"] is True
        assert placement["checks"] == expected_counts(RANKS)
