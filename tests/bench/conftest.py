"""The benchmark tests run on one torch thread (the machine is shared and busy)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Two OpenMP threads on an oversubscribed 2-core machine are 20x slower than one."""
