"""Shared pytest configuration: `cuda`-marked tests are skipped when no CUDA GPU is visible."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not `in item.keywords`: that also matches a path named cuda
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny-model training loops only lose to threading on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
