"""A wheel works without the checkout: it carries its configs, grids and eval tasks, and its commands run.

The wheel is built from this checkout and unpacked with ``pip install --target`` (no editable install); the
commands then run from an empty folder with only that copy of ``tad_torchtune`` on the path (the test checks
that the imported package is the wheel's), over this environment's torch/torchtune.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration_test


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # No build isolation: the build uses this environment's setuptools (no download needed).
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(REPO),
    ]
    subprocess.run(build, check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("tad_torchtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tad_torchtune/configs/tiny_cpu.yaml" in names
    assert "tad_torchtune/configs/experiments/tad_vs_kd_cpu.yaml" in names
    assert any(n.startswith("tad_torchtune/eval/tasks/tiny_offline/") for n in names)
    site = tmp_path_factory.mktemp("site")
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        "--target",
        str(site),
        str(wheel),
    ]
    subprocess.run(install, check=True, capture_output=True, text=True, timeout=300)
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_lists_and_validates_its_configs(wheel_site, tmp_path):
    where = _run(wheel_site, tmp_path, "-c", "import tad_torchtune; print(tad_torchtune.__file__)")
    assert where.stdout.strip().startswith(str(wheel_site)), where.stdout + where.stderr
    ls = _run(wheel_site, tmp_path, "-m", "tad_torchtune.cli", "ls")
    assert ls.returncode == 0, ls.stderr
    assert "tiny_cpu" in ls.stdout and "qwen1.5_1.8b_to_1.2b" in ls.stdout and "phi3_14b_to_llama2_7b" in ls.stdout
    # The paper's T1 config by its shipped name: every check runs, and the missing weights are named clearly.
    val = _run(wheel_site, tmp_path, "-m", "tad_torchtune.cli", "validate", "--config", "qwen1.5_1.8b_to_1.2b")
    out = val.stdout + val.stderr
    assert val.returncode != 0 and "Traceback" not in out, out
    assert "checkpointer.checkpoint_dir" in out and "is not a folder" in out and "nothing was run" in out, out
    grid = _run(
        wheel_site,
        tmp_path,
        "-c",
        "from tad_torchtune.experiments.grid import load_grid; print(load_grid('tad_vs_kd_cpu').name)",
    )
    assert grid.stdout.strip() == "tad_vs_kd_cpu", grid.stderr
