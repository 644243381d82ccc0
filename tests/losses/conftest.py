"""Loss tests use tiny tensors: one intra-op thread is faster than a pool (and far faster when the CI
machine's cores are shared, where OpenMP workers spin against each other)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
