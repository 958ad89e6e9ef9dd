"""Shared fixtures: ``worlds`` runs a test body on N gloo ranks."""

from __future__ import annotations

import pytest

from tests.harness.pool import Worlds


@pytest.fixture(scope="session")
def worlds():
    pools = Worlds()
    yield pools
    pools.close()
