"""Shared fixtures of the modeling tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the duration of a test: the tiny models of these tests gain
    nothing from threads, and on a busy 2-core machine two OpenMP threads spin against other
    processes (the Res5 training test: ~8 s on one thread, ~50 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
