"""Shared fixtures: a fixed seed for every test and the path of the optional shared assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real tokenizers and text that CI has beside the checkout (../shared/assets); a user's clone does not.
SHARED_ASSETS = Path(os.environ.get("TAD_SHARED_ASSETS", REPO_ROOT.parent / "shared" / "assets"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from threads, and the CI machine is shared.
    Packages whose tests all want it request it from an autouse fixture of their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_assets() -> Path:
    """The shared assets folder; the test is skipped (with the reason) where it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {SHARED_ASSETS} (set TAD_SHARED_ASSETS); only CI and devs have them")
    return SHARED_ASSETS
