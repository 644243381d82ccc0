"""``tad-tune flops`` prints what it can know: the config's loss path, units that fit the model, parts that add
up, and a wall-time projection only when a token budget is given."""

from __future__ import annotations

import json
import re

import pytest

from tad_torchtune.planning.flops import estimate_flops_per_token, main
from tad_torchtune.testing.tiny import STUDENT_KWARGS, TEACHER_KWARGS


def _rows(text: str) -> dict[str, float]:
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"^  ([= a-z_]+?)\s+([0-9.e+-]+)", text, re.M)}


def test_tiny_config_without_budget(capsys):
    assert main(["--config", "tiny_cpu"]) == 0
    out = capsys.readouterr().out
    assert "fused=True" in out and "loss=tad" in out and ", in kFLOP:" in out  # the recipe's fused_loss: auto
    assert "tokens" not in out.split("PFLOPs per 1M tokens")[1] and "utilisation" not in out
    rows = _rows(out)
    ref = estimate_flops_per_token(
        {"_component_": "torchtune.models.qwen2.qwen2", **STUDENT_KWARGS},
        {"_component_": "torchtune.models.qwen2.qwen2", **TEACHER_KWARGS},
        48,
        loss="tad",
        fused=True,
        fused_chunk_size=1024,
    )
    assert rows["= total"] * 1e3 == pytest.approx(ref.total, rel=1e-3)
    parts = ["student_forward", "student_backward", "teacher_forward", "loss"]
    assert sum(rows[p] for p in parts) == pytest.approx(rows["= total"], rel=1e-3)
    assert all(rows[p] > 0 for p in parts)


def test_projection_only_when_asked(capsys):
    args = ["--student", "qwen1_5_student_1_2b", "--teacher", "qwen1_5_1_8b", "--seq-len", "2048", "--loss", "tad"]
    assert main(args + ["--json"]) == 0
    assert "total_flops" not in json.loads(capsys.readouterr().out)
    assert main(args + ["--tokens", "2e9"]) == 0
    out = capsys.readouterr().out
    assert "= total                   9.272" in out and "(9.272 PFLOPs per 1M tokens)" in out
    assert "2e+09 tokens: 1.854e+19 FLOPs; peak 989 TFLOP/s" in out and "24 h needs 214.6 TFLOP/s = 21.7%" in out
