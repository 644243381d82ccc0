"""Fixtures for the reliability tests: tiny assets, tiny configs, hashing a folder, running the recipe."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from tad_torchtune.testing.tiny import TINY_CONFIG_PATH as TINY_CONFIG  # noqa: F401 (re-exported)
from tad_torchtune.testing.tiny import tiny_config as tiny_cfg  # noqa: F401 (re-exported)
from tad_torchtune.testing.tiny import write_tiny_assets

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Random tiny teacher/student checkpoints and a 64-line corpus (``tad_torchtune.testing.tiny``)."""
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), seed=0)


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (plus folders, so an added empty one shows)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for recipe subprocesses: one thread (bitwise-reproducible CPU math), venv bin on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEST_FAULT", "TEST_TRACE"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env
