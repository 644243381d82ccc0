"""Fixtures for the recipe tests: tiny assets written once per worker, and helpers to run the recipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tad_torchtune.testing.tiny import TINY_CONFIG_PATH as TINY_CONFIG  # noqa: F401 (re-exported)
from tad_torchtune.testing.tiny import tiny_config as tiny_cfg  # noqa: F401 (re-exported)
from tad_torchtune.testing.tiny import write_tiny_assets

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """Random tiny teacher/student checkpoints and a 64-line corpus (``tad_torchtune.testing.tiny``)."""
    return write_tiny_assets(tmp_path_factory.mktemp("tiny_assets"), seed=0)


def run_in_process(cfg):
    """Runs the recipe in this process (:func:`tad_torchtune.recipes.kd_tad.run`); returns the finished recipe."""
    from tad_torchtune.recipes.kd_tad import run

    return run(cfg)


def read_disk_log(output_dir: Path) -> list[dict[str, float]]:
    """Per-step metrics from torchtune's DiskLogger file(s) under ``output_dir/logs``."""
    rows = []
    for path in sorted((Path(output_dir) / "logs").glob("log_*.txt")):
        for line in path.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)$", line)
            if m:
                values = dict(kv.split(":", 1) for kv in m.group(2).split())
                rows.append({"step": int(m.group(1)), **{k: float(v) for k, v in values.items()}})
    return rows


def run_cli(args: list[str], cwd: Path = REPO_ROOT, timeout: int = 240) -> subprocess.CompletedProcess:
    """Runs a real command line; fails the test with its output when it exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc
