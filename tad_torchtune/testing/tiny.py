"""Tiny random teacher/student checkpoints and a small text corpus for the tiny CPU configs and tests.

``python -m tad_torchtune.testing.tiny DIR`` writes::

    DIR/teacher/model.pt   qwen2 component builder: 3 layers, dim 64, vocab 264 (extra rows are cut by the loss)
    DIR/student/model.pt   qwen2 component builder: 2 layers, dim 64, vocab 259 (= ByteTokenizer)
    DIR/data/train.jsonl   64 lines of {"text": ...}
    DIR/data/heldout.txt   256 other sentences, one paragraph each (held-out text for diagnose / Full-ECE)
    DIR/data/qa.jsonl      64 {"question": "12+7", "answer": "19"} sums (prompt/response data, on-policy config)

``configs/tiny_cpu.yaml`` reads them through ``assets_dir=DIR``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune.models.qwen2._component_builders import qwen2

# The shipped tiny config (inside the package: tad_torchtune/configs).
TINY_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"

# Shared by the tiny configs (keep in sync with configs/tiny_*.yaml).
STUDENT_KWARGS = dict(
    vocab_size=259, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=128
)
TEACHER_KWARGS = dict(
    vocab_size=264, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=192, max_seq_len=128
)

_WORDS = (
    "the a teacher student model learns token tail head distribution probability small large data text "
    "train step loss mass top rare common word next predicts from with and of to in is on"
).split()


def tiny_text(num_lines: int = 64, seed: int = 0) -> list[str]:
    """Deterministic short sentences (10-50 bytes)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 9))]
        lines.append(" ".join(words)[:50])
    return lines


def tiny_sums(num_rows: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic two-number sums as ``{"question": "12+7", "answer": "19"}`` rows (prompt/response data)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"question": f"{a}+{b}", "answer": str(a + b)})
    return rows


def write_tiny_assets(root: str | Path, seed: int = 0, num_lines: int = 64) -> Path:
    """Writes the tiny teacher, student and data under ``root`` (idempotent for a given seed)."""
    root = Path(root)
    torch.manual_seed(seed)
    for name, kwargs in (("teacher", TEACHER_KWARGS), ("student", STUDENT_KWARGS)):
        model = qwen2(**kwargs)
        if name == "teacher":
            # A random init is nearly uniform; sharpen the teacher so it has a real head and tail.
            with torch.no_grad():
                model.output.weight.mul_(8.0)
        (root / name).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), root / name / "model.pt")
    (root / "data").mkdir(parents=True, exist_ok=True)
    with open(root / "data" / "train.jsonl", "w") as f:
        for line in tiny_text(num_lines, seed):
            f.write(json.dumps({"text": line}) + "\n")
    # held-out text for `tad-tune diagnose` / eval_tad's Full-ECE (docs/eval.md section 6): other sentences,
    # one paragraph each
    (root / "data" / "heldout.txt").write_text("\n\n".join(tiny_text(4 * num_lines, seed + 1)) + "\n")
    # prompt/response pairs for configs/tiny_cpu_on_policy.yaml (on-policy distillation needs a prompt mask)
    with open(root / "data" / "qa.jsonl", "w") as f:
        for row in tiny_sums(num_lines, seed):
            f.write(json.dumps(row) + "\n")
    return root


def tiny_config(assets_dir: str | Path, output_dir: str | Path, **overrides: Any) -> DictConfig:
    """``configs/tiny_cpu.yaml`` with the given assets and output dir, plus dotted-key overrides
    (``tiny_config(a, o, **{"kd_loss.top_k": 4})``). Used by the tests of several packages."""
    cfg = OmegaConf.load(TINY_CONFIG_PATH)
    cfg.assets_dir = str(assets_dir)
    cfg.output_dir = str(output_dir)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tad_torchtune.testing.tiny", description=__doc__)
    parser.add_argument("root", help="folder to write teacher/, student/ and data/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_assets(args.root, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
