"""Loss tests use tiny tensors: one intra-op thread is faster than a pool (and far faster when the CI
machine's cores are shared, where OpenMP workers spin against each other)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""
