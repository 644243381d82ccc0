"""The eval_tad recipe end to end on CPU (the user's `tune run` command), the report table, the diagnose CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.eval.conftest import DIMS, ROPE_BASE, build_tiny_hf_dir


def _write_cfg(path: Path, hf_dir: Path, out_dir: Path, **extra) -> Path:
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    lines = [
        f"output_dir: {out_dir}",
        "run_name: TAD",
        "device: cpu",
        "dtype: fp32",
        "model:",
        "  _component_: torchtune.models.llama3._component_builders.llama3",
        f"  vocab_size: {vocab}",
        f"  rope_base: {ROPE_BASE}",
        *[f"  {k}: {v}" for k, v in DIMS.items()],
        "checkpointer:",
        "  _component_: torchtune.training.FullModelHFCheckpointer",
        f"  checkpoint_dir: {hf_dir}",
        "  checkpoint_files: auto",
        "  model_type: LLAMA3",
        f"  output_dir: {out_dir}/unused",
        "tokenizer:",
        "  _component_: torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer",
        f"  tokenizer_json_path: {hf_dir}/tokenizer.json",
        f"  tokenizer_config_json_path: {hf_dir}/tokenizer_config.json",
        f"  generation_config_path: {hf_dir}/generation_config.json",
    ]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.integration_test
def test_eval_recipe_tune_run_end_to_end(tiny_hf_dir, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("Question: What is 2 plus 3?\nAnswer: 2 + 3 = 5. The answer is 5.\n" * 20)
    base = {
        "results": {
            "tiny_arith_mc": {"acc,none": 0.25, "alias": "tiny_arith_mc"},
            "tiny_arith_gen": {"exact_match,first-number": 0.5},
        },
        "full_ece": {"full_ece": 0.02},
    }
    (tmp_path / "base.json").write_text(json.dumps(base))
    out = tmp_path / "out"
    cfg = _write_cfg(
        tmp_path / "eval.yaml",
        tiny_hf_dir,
        out,
        tasks=["tiny_offline"],
        include_defaults=False,
        limit=8,
        batch_size=4,
        max_seq_len=256,
        max_gen_toks=6,
        baseline_results=str(tmp_path / "base.json"),
        full_ece={"text": str(text), "n_bins": 10, "seq_len": 32, "batch_size": 2, "max_batches": 3},
        log_samples=True,
    )
    proc = subprocess.run(
        ["tune", "run", "tad_torchtune.eval.eval_tad", "--config", str(cfg), "run_name=TAD"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    acc = res["results"]["tiny_arith_mc"]["acc,none"]
    em = res["results"]["tiny_arith_gen"]["exact_match,first-number"]
    assert 0 <= acc <= 1 and 0 <= em <= 1 and res["results"]["tiny_text_ppl"]["word_perplexity,none"] > 1
    assert res["full_ece"]["num_tokens"] == 3 * 2 * 32 and 0 <= res["full_ece"]["full_ece"] <= 2
    assert (out / "samples_tiny_arith_mc.jsonl").read_text().count("\n") == 8
    table = (out / "results.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ")]
    assert rows[0].split(" | ")[:3] == ["| Model", "tiny_arith_mc", "tiny_arith_gen"] and "Rel" in rows[0]
    assert rows[1].startswith("| vanilla KD | 25.0 | 50.0 |")
    cells = rows[2].strip("| ").split(" | ")
    assert cells[0] == "TAD" and cells[1] == f"{100 * acc:.1f}"
    terms = [100 * math.log(a / b) for a, b in ((acc, 0.25), (em, 0.5)) if a > 0]
    rel = cells[rows[0].strip("| ").split(" | ").index("Rel")]
    assert rel == ("–" if not terms else f"{sum(terms) / len(terms):+.1f}")
    assert cells[-1] == f"{100 * res['full_ece']['full_ece']:.3g}"  # F-ECE column in percent


def test_markdown_table_layout_and_rel():
    from tad_torchtune.eval.report import markdown_table

    def res(hs, wg):
        return {
            "results": {
                "commonsense8": {"acc,none": 0.0},
                "hellaswag": {"acc,none": hs, "acc_norm,none": hs + 0.1, "acc_stderr,none": 0.01},
                "winogrande": {"acc,none": wg},
            },
            "group_subtasks": {"commonsense8": ["hellaswag", "winogrande"]},
        }

    table = markdown_table(
        {"KD": res(0.40, 0.50), "TAD": res(0.44, 0.55)},
        ["commonsense8"],
        baseline="KD",
        metrics={"hellaswag": "acc_norm"},
    )
    lines = table.splitlines()
    assert lines[0] == "| Model | HS | WG | Avg | Rel |"
    assert lines[2] == "| KD | 50.0 | 50.0 | 50.0 | – |"
    rel = (100 * math.log(0.54 / 0.50) + 100 * math.log(0.55 / 0.50)) / 2
    assert lines[3] == f"| TAD | 54.0 | 55.0 | 54.5 | {rel:+.1f} |"


def test_diagnose_cli_tail_kl_ece(tiny_hf_dir, tmp_path):
    from tad_torchtune.eval.diagnostics import main, read_heldout_csv

    teacher_dir = build_tiny_hf_dir(tmp_path / "teacher", seed=7, scale=6.0)
    ckpts = [build_tiny_hf_dir(tmp_path / f"run/epoch_{i}", seed=7, scale=1.0 + 2.0 * i) for i in range(2)]
    cfg = _write_cfg(tmp_path / "diag.yaml", tiny_hf_dir, tmp_path / "unused")
    text = cfg.read_text()
    teacher = text.split("model:\n", 1)[1].split("tokenizer:\n")[0].replace(str(tiny_hf_dir), str(teacher_dir))
    cfg.write_text(text + "teacher_model:\n" + teacher.replace("checkpointer:", "teacher_checkpointer:", 1))
    data = tmp_path / "heldout.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"Question: What is {i} plus 1? Answer: {i + 1}"}) + "\n" for i in range(40))
    )
    common = ["--config", str(cfg), "--text", str(data), "--seq-len", "24", "--batch-size", "2", "--max-batches", "2"]
    out = tmp_path / "diag"
    assert main(["tail", *common, "--out", str(out), "--kmax", "20"]) == 0
    lines = (out / "teacher_tail_mass.csv").read_text().splitlines()
    assert len(lines) == 21 and (out / "teacher_tail_mass.png").stat().st_size > 5000
    assert main(["kl", *common, "--out", str(out), "--name", "tad", "--checkpoints", *map(str, ckpts), "seed=3"]) == 0
    kl = read_heldout_csv(out / "heldout_kl_tad.csv")
    assert [s for s, _ in kl] == [0, 1] and all(v > 0 for _, v in kl)
    assert kl[1][1] < kl[0][1]  # epoch_1 has the teacher's weights at a closer output scale
    assert main(["ece", *common, "--out", str(out), "--bins", "5"]) == 0
    assert (out / "full_ece.csv").read_text().splitlines()[1].split(",")[-1] == "5"
    with pytest.raises(SystemExit):
        main(["--help"])
