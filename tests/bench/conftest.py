"""Shared fixtures of the benchmark tests: one torch thread (the machine is shared and busy)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Two OpenMP threads on an oversubscribed 2-core machine are 20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
