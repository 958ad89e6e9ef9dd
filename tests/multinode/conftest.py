"""Fixtures for emulated-host tests: skip where namespaces cannot be built,
and remove namespaces left behind by runs that were killed."""

from __future__ import annotations

import pytest

from alltoall.testing import EmulatedCluster, netns, unavailable_reason


@pytest.fixture(scope="session")
def cluster_factory() -> type[EmulatedCluster]:
    """``EmulatedCluster`` itself, once this machine is known to support it.
    Tests use it as a context manager, so every cluster is removed even when
    the test fails or times out."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no emulated cluster here: {reason}")
    netns.remove_leftovers()
    return EmulatedCluster
