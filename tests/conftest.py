"""Shared fixtures.

``worlds`` runs a test body on N gloo ranks, once per transport: "auto"
(shared memory wherever a group's ranks share a host, which on this machine
is every group) and "c10d" (gloo's TCP for every phase), so every
distributed test is a differential test of both.

Every test also checks that it leaves nothing in /dev/shm.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.harness.pool import Worlds

TRANSPORTS = ("auto", "c10d")
SHM_DIR = "/dev/shm"

# A profile calibrated on this machine (~/.cache/alltoall/profile.json) would
# change what "auto" picks in every test; tests that want one pass it.
os.environ["ALLTOALL_PROFILE"] = "off"


@pytest.fixture(scope="session")
def world_pools():
    pools = Worlds()
    yield pools
    pools.close()


class TransportWorlds:
    """``Worlds`` with ALLTOALL_TRANSPORT set for every run."""

    def __init__(self, pools: Worlds, transport: str) -> None:
        self.pools = pools
        self.transport = transport

    def run(self, world_size: int, fn: Any, *args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> list[Any]:
        return self.pools.run(world_size, fn, *args, env={"ALLTOALL_TRANSPORT": self.transport, **(env or {})},
                              **kwargs)


@pytest.fixture(params=TRANSPORTS)
def worlds(request, world_pools):
    return TransportWorlds(world_pools, request.param)


def _segments() -> set[str]:
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith("alltoall-")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_shared_memory_left():
    before = _segments()
    yield
    left = _segments() - before
    assert not left, f"the test left shared-memory segments in {SHM_DIR}: {sorted(left)}"
