"""Drop-in check inside torchtune itself: its own ``knowledge_distillation_single_device`` recipe, launched
through the real ``tune run`` CLI, with only ``kd_loss._component_`` pointing at our losses.

The base config is torchtune's own ``qwen2/1.5_to_0.5B_KD_lora_single_device.yaml`` from the installed
wheel, with the model dimensions made tiny, CPU/fp32, and everything it would download replaced by files
this test writes: random student and teacher checkpoints, a byte-level BPE tokenizer trained here with
``tokenizers`` (vocab.json + merges.txt + special tokens), and a few Alpaca-style JSON records.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytestmark = pytest.mark.integration_test

VOCAB = 320  # the tokenizer below has 317 ids; the models' vocabulary may be larger (padding rows)
SEQ = 96
DIMS = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": SEQ}
STUDENT_DIMS = {**DIMS, "vocab_size": VOCAB, "embed_dim": 32, "intermediate_dim": 64}
TEACHER_DIMS = {**DIMS, "vocab_size": VOCAB, "embed_dim": 48, "intermediate_dim": 96, "num_layers": 3}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
RECORDS = [
    {"instruction": "Name a colour of the sky.", "input": "", "output": "The sky is often blue."},
    {"instruction": "Add the numbers.", "input": "two and three", "output": "Two and three make five."},
    {"instruction": "Give an animal that can fly.", "input": "", "output": "A bird can fly."},
    {"instruction": "Say hello politely.", "input": "to a friend", "output": "Hello, my friend, how are you?"},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
    {"instruction": "What is water made of?", "input": "", "output": "Water is hydrogen and oxygen."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "Name a season.", "input": "", "output": "Winter is a cold season."},
]


def _write_tokenizer(out: Path) -> None:
    """A tiny byte-level BPE in the Qwen2 file layout (vocab.json, merges.txt, tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 3, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [json.dumps(r) for r in RECORDS] * 4 + [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction:\n### Input:\n### Response:\n",
    ]
    tok.train_from_iterator(corpus, trainer)
    tok.model.save(str(out))  # vocab.json + merges.txt
    tok.save(str(out / "tokenizer.json"))  # its "added_tokens" give torchtune the special-token ids


def _write_checkpoints(out: Path) -> None:
    from torchtune.models.qwen2 import qwen2

    for name, dims in (("student", STUDENT_DIMS), ("teacher", TEACHER_DIMS)):
        torch.manual_seed(0 if name == "student" else 1)
        model = qwen2(**dims)
        (out / name).mkdir()
        torch.save(model.state_dict(), out / name / "model.pt")


def _base_config(tmp_path: Path) -> Path:
    """torchtune's own qwen2 KD config with tiny models and local files; CPU, fp32, 3 steps."""
    # torchtune's wheel installs its recipes and configs as the top-level `recipes` (which refuses imports).
    recipes_dir = Path(importlib.util.find_spec("recipes").submodule_search_locations[0])
    wheel_cfg = recipes_dir / "configs" / "qwen2" / "1.5_to_0.5B_KD_lora_single_device.yaml"
    cfg = OmegaConf.load(wheel_cfg)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    overrides = {
        "output_dir": str(tmp_path / "out"),
        "model": {"_component_": "torchtune.models.qwen2.lora_qwen2", **STUDENT_DIMS, "lora_rank": 4, "lora_alpha": 8},
        "teacher_model": {"_component_": "torchtune.models.qwen2.qwen2", **TEACHER_DIMS},
        "tokenizer": {
            "path": str(tmp_path / "tok" / "vocab.json"),
            "merges_file": str(tmp_path / "tok" / "merges.txt"),
            "special_tokens_path": str(tmp_path / "tok" / "tokenizer.json"),
            "max_seq_len": SEQ,
        },
        "dataset": {
            "_component_": "torchtune.datasets.alpaca_dataset",
            "source": "json",
            "data_files": str(data),
            "split": "train",
            "train_on_input": True,  # keep valid labels even if a prompt is truncated
            "packed": False,
        },
        "seed": 0,
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps_per_epoch": 3,
        "lr_scheduler": {"num_warmup_steps": 1},
        "device": "cpu",
        "dtype": "fp32",
        "log_peak_memory_stats": False,
        "metric_logger": {"log_dir": str(tmp_path / "logs")},
    }
    cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    for key, sub in (("checkpointer", "student"), ("teacher_checkpointer", "teacher")):
        cfg[key] = {
            "_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
            "checkpoint_dir": str(tmp_path / "ckpt" / sub),
            "checkpoint_files": ["model.pt"],
            "recipe_checkpoint": None,
            "output_dir": str(tmp_path / "out" / sub),
            "model_type": "QWEN2",
        }
    path = tmp_path / "kd_tiny.yaml"
    OmegaConf.save(cfg, path)
    return path


@pytest.fixture(scope="module")
def tiny_kd_setup(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("kd_dropin")
    (tmp_path / "tok").mkdir()
    (tmp_path / "ckpt").mkdir()
    _write_tokenizer(tmp_path / "tok")
    _write_checkpoints(tmp_path / "ckpt")
    return _base_config(tmp_path)


def _tune_run(config: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict[str, float]]]:
    tune = Path(sys.executable).with_name("tune")
    cmd = [str(tune), "run", "knowledge_distillation_single_device", "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    log_dir = config.parent / "logs"
    steps = []
    for log in sorted(log_dir.glob("*.txt")) if log_dir.is_dir() else []:
        for line in log.read_text().splitlines():
            if line.startswith("Step "):
                steps.append({k: float(v) for k, v in re.findall(r"(\w+):([-+0-9.eE]+|nan|inf)", line)})
        log.unlink()  # the next run of the module-scoped setup writes its own log
    return proc, steps


@pytest.mark.parametrize(
    "component",
    ["tad_torchtune.TADLoss", "tad_torchtune.ForwardKLLoss"],
)
def test_torchtune_kd_recipe_runs_with_our_loss(tiny_kd_setup: Path, component: str):
    proc, steps = _tune_run(tiny_kd_setup, f"kd_loss._component_={component}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(steps) == 3, proc.stderr[-2000:]
    # torchtune logs the resolved config: the loss really was swapped.
    assert re.search(rf"kd_loss:\s*\n\s*_component_: {re.escape(component)}", proc.stdout + proc.stderr)
    for step in steps:
        for key in ("loss", "class_loss", "kd_loss"):
            assert math.isfinite(step[key]), step
        # A random tiny teacher and student disagree: the divergence is positive, and the total is the
        # recipe's (1 − kd_ratio)·CE + kd_ratio·KD with kd_ratio = 0.5.
        assert step["kd_loss"] > 0
        assert step["loss"] == pytest.approx(0.5 * step["class_loss"] + 0.5 * step["kd_loss"], rel=1e-3, abs=1e-3)
