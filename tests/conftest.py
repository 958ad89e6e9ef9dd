"""Shared fixtures: ``worlds`` runs a test body on N gloo ranks. Tests marked
``gpu`` (or ``gpu(n)``) are skipped, saying why, where CUDA devices are
missing or the extension was built without CUDA."""

from __future__ import annotations

import pytest

from tests.harness.devices import extension_has_cuda, missing_devices
from tests.harness.pool import Worlds


@pytest.fixture(scope="session")
def worlds():
    pools = Worlds()
    yield pools
    pools.close()


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
