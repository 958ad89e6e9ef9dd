"""The backend's settings and policy rule (single process), and its
registration as alltoall-info reports it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.distributed as dist

from alltoall.backend import is_registered
from alltoall.backend.settings import ALWAYS, resolve_algorithm, resolve_inner, resolve_policy
from alltoall.topology import Topology


def test_importing_alltoall_registers_the_backend_without_changing_defaults():
    assert is_registered()
    plugin = dist.Backend._plugins["ALLTOALL"]
    assert plugin.extended_api
    assert dist.Backend.backend_capability["alltoall"] == ["cpu", "cuda"]
    assert dist.Backend.default_device_backend_map["cpu"] == "gloo"


def test_alltoall_info_shows_the_backend():
    out = subprocess.run([sys.executable, "-m", "alltoall.cli.info"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert "torch.distributed backend 'alltoall': registered" in out


@pytest.mark.parametrize("raw,expected", [
    (None, {"cpu": "gloo"}),
    ("gloo", {"cpu": "gloo"}),
    ("cpu:gloo,cuda:nccl", {"cpu": "gloo"}),
])
def test_inner_backend_on_a_machine_without_gpus(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("ALLTOALL_INNER_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ALLTOALL_INNER_BACKEND", raw)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_inner() == expected


@pytest.mark.parametrize("raw,message", [
    ("mpi:gloo", "'mpi:gloo' is not valid"),
    ("cpu:gloo,cpu:gloo", "'cpu:gloo' is not valid"),
    ("ucx", "'ucx' is neither gloo, nccl nor a registered backend"),
    ("alltoall", "cannot wrap itself"),
])
def test_bad_inner_backend(monkeypatch, raw, message):
    monkeypatch.setenv("ALLTOALL_INNER_BACKEND", raw)
    with pytest.raises(ValueError, match=message):
        resolve_inner()


def test_bad_algorithm(monkeypatch):
    monkeypatch.setenv("ALLTOALL_ALGORITHM", "fastest")
    with pytest.raises(ValueError, match="ALLTOALL_ALGORITHM='fastest'"):
        resolve_algorithm()


def test_policy_follows_the_communicator_rule(monkeypatch):
    monkeypatch.delenv("ALLTOALL_AUTO_MAX_PEER_BYTES", raising=False)
    real = Topology.from_node_ids(["a", "a", "b", "b"], 0)
    emulated = Topology.emulate(4, 2, 0)
    uneven = Topology.from_node_ids(["a", "a", "a", "b"], 0)
    auto = resolve_policy("auto", real)
    assert (auto.equal_up_to, auto.uneven) == (8 * 1024, True)
    assert resolve_policy("auto", emulated).equal_up_to == -1
    assert resolve_policy("hierarchical", emulated).equal_up_to == ALWAYS
    forced = resolve_policy("hierarchical", uneven)
    assert (forced.equal_up_to, forced.uneven) == (-1, False) and "[3, 1]" in forced.reason
    assert not resolve_policy("flat", real).uses_hierarchical
