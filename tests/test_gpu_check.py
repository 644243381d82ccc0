"""The GPU check script's dry run (tiny sizes, CPU): every part runs and writes its results, so the script
cannot rot between GPU slots (issue 17)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu" / "check.py"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["dry_run"] is True
    parts = result["parts"]
    assert list(parts) == ["env", "correctness", "loss_stage", "recipe", "gemma2"]
    assert all(p["ok"] for p in parts.values()), {k: p.get("error") for k, p in parts.items()}
    # The loss family against the fp64 reference on the rounded logits, and the 4096-position row's w(X).
    worst = parts["correctness"]["worst_rel_err_value"]
    assert max(worst.values()) < 1e-5, worst
    assert max(parts["correctness"]["long_row_rel_err_w"].values()) < 1e-6
    assert parts["correctness"]["deterministic"] == {"bitwise_equal": True}
    for name in ("correctness", "loss_stage", "recipe"):
        with open(tmp_path / f"{name}.csv") as f:
            assert list(csv.DictReader(f)), name
    recipe = {r["cell"]: r for r in parts["recipe"]["rows"]}
    assert {"tad_fused_eager", "fkl_fused_eager", "tad_chunked_eager"} <= set(recipe)
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in recipe.values())
    assert parts["gemma2"]["parity_max_abs_diff"] < 1e-4 and parts["gemma2"]["logit_softcap_respected"]


def test_gpu_check_refuses_without_cuda_unless_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the refusal is what a CPU machine sees
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu" / "check.py"), "--parts", "env"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
