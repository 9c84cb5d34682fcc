"""Fixtures of the serve tests (tiny checkpoints: ``checkpoints.py`` next to this file; the real server:
``benchmarks/server.py``, which the load benchmark uses too)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops on a shared 2-core machine run 10-40x slower with 2 intra-op threads (each op waits for a
    descheduled OpenMP worker); the serve tests pin one thread and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
