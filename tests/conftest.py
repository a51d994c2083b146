"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread for the whole run: the test problems are tiny, and on a small shared machine
    multithreaded BLAS on tiny matrices only adds contention (seen: hundreds of times slower)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
