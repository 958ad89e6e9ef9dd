"""Shared fixtures.

``worlds`` runs a test body on N gloo ranks, once per transport: "auto"
(shared memory wherever a group's ranks share a host, which on this machine
is every group) and "c10d" (gloo's TCP for every phase), so every
distributed test is a differential test of both. The shared-memory runs use
1 KiB rings and single copies from 4 KiB, so the tests' messages also
stream through rings in chunks and take the cross-memory path.

Every test also checks that it leaves nothing in /dev/shm. The session
names its segments with a prefix of its own (``ALLTOALL_SHM_PREFIX``, which
every rank process inherits), so other jobs' segments on the same machine
do not count.

Tests marked ``gpu`` (or ``gpu(n)``) are skipped, saying why, where CUDA
devices are missing or the extension was built without CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.harness.devices import extension_has_cuda, missing_devices
from tests.harness.pool import Worlds

TRANSPORTS = {
    "shm": {"ALLTOALL_TRANSPORT": "auto", "ALLTOALL_SHM_RING_BYTES": "1024", "ALLTOALL_SHM_SINGLE_COPY_BYTES": "4096"},
    "c10d": {"ALLTOALL_TRANSPORT": "c10d"},
}
SHM_DIR = "/dev/shm"
SESSION_PREFIX = f"alltoall-test{os.getpid()}-"
os.environ["ALLTOALL_SHM_PREFIX"] = SESSION_PREFIX

# A profile calibrated on this machine (~/.cache/alltoall/profile.json) would
# change what "auto" picks in every test; tests that want one pass it.
os.environ["ALLTOALL_PROFILE"] = "off"


@pytest.fixture(scope="session")
def world_pools():
    pools = Worlds()
    yield pools
    pools.close()


class TransportWorlds:
    """``Worlds`` with a transport's environment set for every run."""

    def __init__(self, pools: Worlds, transport: str) -> None:
        self.pools = pools
        self.transport = transport

    def run(self, world_size: int, fn: Any, *args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> list[Any]:
        return self.pools.run(world_size, fn, *args, env={**TRANSPORTS[self.transport], **(env or {})}, **kwargs)


@pytest.fixture(params=list(TRANSPORTS))
def worlds(request, world_pools):
    return TransportWorlds(world_pools, request.param)


def _segments() -> set[str]:
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(SESSION_PREFIX)}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_shared_memory_left():
    before = _segments()
    yield
    left = _segments() - before
    assert not left, f"the test left shared-memory segments in {SHM_DIR}: {sorted(left)}"


def pytest_collection_modifyitems(config, items) -> None:
    built_with_cuda = None
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        reason = missing_devices(int(marker.args[0]) if marker.args else 1)
        if reason is None:
            if built_with_cuda is None:
                built_with_cuda = extension_has_cuda()
            if not built_with_cuda:
                reason = "alltoall._C was built without CUDA (make test-gpu builds it with CUDA)"
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
