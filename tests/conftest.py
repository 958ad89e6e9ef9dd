"""Shared fixtures: ``worlds`` runs a test body on N gloo ranks."""

from __future__ import annotations

import os

import pytest

from tests.harness.pool import Worlds

# A profile calibrated on this machine (~/.cache/alltoall/profile.json) would
# change what "auto" picks in every test; tests that want one pass it.
os.environ["ALLTOALL_PROFILE"] = "off"


@pytest.fixture(scope="session")
def worlds():
    pools = Worlds()
    yield pools
    pools.close()
