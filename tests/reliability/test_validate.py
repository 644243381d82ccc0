"""Start-up validation: a table of bad configs, each giving exactly one clear problem and touching nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tad_torchtune.checkpoint.steps import save_step_checkpoint
from tad_torchtune.validate import ConfigValidationError, main, validate_config
from tests.reliability.conftest import TINY_CONFIG, tiny_cfg, tree_hash


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An output dir holding a previous run's complete step checkpoint (must survive every validation)."""
    out = tmp_path_factory.mktemp("existing_run")
    save_step_checkpoint(
        out / "checkpoints", 2, {"w": torch.ones(3)}, {"state": {}}, {"global_step": 2, "world_size": 1}
    )
    (out / "logs").mkdir()
    (out / "logs" / "log_1.txt").write_text("Step 1 | loss:1.0\n")
    return out


def _write_lines(path: Path, n: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{{"text": "line {i} of the tiny corpus"}}\n' for i in range(n)))
    return str(path)


def _pickle_payload_file(path: Path) -> Path:
    """A torch.save file whose unpickling would create ``path.parent / 'PWNED'``."""

    class Payload:
        def __reduce__(self):
            return (Path.touch, (path.parent / "PWNED",))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Payload()}, path)
    return path


# (id, mutation(cfg, assets, tmp), expected key, regex the one message must match)
CASES = [
    (
        "misspelled_top_key",
        lambda c, a, t: OmegaConf.update(c, "epohcs", 2, force_add=True),
        "epohcs",
        r"unknown config key; did you mean 'epochs'",
    ),
    (
        "unknown_top_key",
        lambda c, a, t: OmegaConf.update(c, "frobnicate", 1, force_add=True),
        "frobnicate",
        r"unknown config key",
    ),
    (
        "misspelled_loss_arg",
        lambda c, a, t: OmegaConf.update(c, "kd_loss.topk", 5, force_add=True),
        "kd_loss.topk",
        r"no argument 'topk'; did you mean 'top_k'",
    ),
    (
        "misspelled_optimizer_arg",
        lambda c, a, t: OmegaConf.update(c, "optimizer.weight_decai", 0.1, force_add=True),
        "optimizer.weight_decai",
        r"did you mean 'weight_decay'",
    ),
    (
        "misspelled_policy",
        lambda c, a, t: OmegaConf.update(c, "nonfinite_policy", "skp", force_add=True),
        "nonfinite_policy",
        r"must be 'skip' or 'stop'.*did you mean 'skip'",
    ),
    (
        "bad_component_path",
        lambda c, a, t: OmegaConf.update(c, "kd_loss._component_", "tad_torchtune.TADLos"),
        "kd_loss._component_",
        r"cannot import 'tad_torchtune.TADLos'",
    ),
    (
        "top_k_eq_vocab",
        lambda c, a, t: OmegaConf.update(c, "kd_loss.top_k", 259),
        "kd_loss.top_k",
        r"top_k=259 must be smaller than the student vocabulary \(259\)",
    ),
    ("top_k_zero", lambda c, a, t: OmegaConf.update(c, "kd_loss.top_k", 0), "kd_loss.top_k", r"must be >= 1, got 0"),
    ("beta_zero", lambda c, a, t: OmegaConf.update(c, "kd_loss.beta", 0.0), "kd_loss.beta", r"must be > 0, got 0"),
    ("beta_negative", lambda c, a, t: OmegaConf.update(c, "kd_loss.beta", -1.0), "kd_loss.beta", r"must be > 0"),
    ("lr_zero", lambda c, a, t: OmegaConf.update(c, "optimizer.lr", 0.0), "optimizer.lr", r"must be > 0, got 0"),
    ("lr_negative", lambda c, a, t: OmegaConf.update(c, "optimizer.lr", -1e-3), "optimizer.lr", r"must be > 0"),
    (
        "kd_chunks_zero",
        lambda c, a, t: OmegaConf.update(c, "kd_loss.num_output_chunks", 0),
        "kd_loss.num_output_chunks",
        r"must be >= 1, got 0",
    ),
    (
        "ce_chunks_zero",
        lambda c, a, t: OmegaConf.update(c, "loss.num_output_chunks", 0),
        "loss.num_output_chunks",
        r"must be >= 1",
    ),
    ("batch_size_zero", lambda c, a, t: OmegaConf.update(c, "batch_size", 0), "batch_size", r"must be >= 1"),
    (
        "accum_zero",
        lambda c, a, t: OmegaConf.update(c, "gradient_accumulation_steps", 0),
        "gradient_accumulation_steps",
        r"must be >= 1",
    ),
    ("epochs_float", lambda c, a, t: OmegaConf.update(c, "epochs", 1.5), "epochs", r"must be an integer"),
    (
        "kd_ratio_above_one",
        lambda c, a, t: OmegaConf.update(c, "kd_ratio", 1.5, force_add=True),
        "kd_ratio",
        r"must be in \[0, 1\]",
    ),
    ("dtype_fp16", lambda c, a, t: OmegaConf.update(c, "dtype", "fp16"), "dtype", r"must be fp32 or bf16"),
    (
        "seq_len_too_long",
        lambda c, a, t: OmegaConf.update(c, "tokenizer.max_seq_len", 512),
        "tokenizer.max_seq_len",
        r"512 is larger than model supports \(model.max_seq_len=128\)",
    ),
    (
        "missing_checkpoint_file",
        lambda c, a, t: OmegaConf.update(c, "checkpointer.checkpoint_files", ["nope.pt"]),
        "checkpointer.checkpoint_files",
        r"missing under .*: nope.pt",
    ),
    (
        "missing_checkpoint_dir",
        lambda c, a, t: OmegaConf.update(c, "teacher_checkpointer.checkpoint_dir", str(t / "x")),
        "teacher_checkpointer.checkpoint_dir",
        r"is not a folder",
    ),
    (
        "teacher_ckpt_is_student",
        lambda c, a, t: OmegaConf.update(c, "teacher_checkpointer.checkpoint_dir", str(a / "student")),
        "teacher_checkpointer.checkpoint_files",
        r"does not match teacher_model: .*shape mismatch",
    ),
    (
        "student_dims_changed",
        lambda c, a, t: OmegaConf.update(c, "model.intermediate_dim", 96),
        "checkpointer.checkpoint_files",
        r"does not match model: .*file \(128, 64\) vs model \(96, 64\)",
    ),
    (
        "teacher_vocab_smaller",
        lambda c, a, t: (c.pop("checkpointer"), OmegaConf.update(c, "model.vocab_size", 300)),
        "teacher_model.vocab_size",
        r"teacher vocabulary 264 < student vocabulary 300",
    ),
    (
        "tokenizer_vocab_larger",
        lambda c, a, t: (c.pop("checkpointer"), OmegaConf.update(c, "model.vocab_size", 200)),
        "tokenizer",
        r"tokenizer has 259 ids but the student embeds only 200",
    ),
    (
        "unsafe_pickle_checkpoint",
        lambda c, a, t: OmegaConf.update(
            c, "checkpointer.checkpoint_dir", str(_pickle_payload_file(t / "evil" / "model.pt").parent)
        ),
        "checkpointer.checkpoint_files",
        r"refusing to load .*model.pt",
    ),
    (
        "dataset_too_short",
        lambda c, a, t: OmegaConf.update(c, "dataset.data_files", _write_lines(t / "d/s.jsonl", 3)),
        "dataset",
        r"has 3 samples but one optimizer step needs 4",
    ),
    (
        "dataset_missing_file",
        lambda c, a, t: OmegaConf.update(c, "dataset.data_files", str(t / "nope.jsonl")),
        "dataset",
        r"cannot build the dataset",
    ),
    (
        "output_dir_under_file",
        lambda c, a, t: ((t / "f").write_text("x"), OmegaConf.update(c, "output_dir", str(t / "f" / "run"))),
        "output_dir",
        r"cannot be created: .* is a file",
    ),
    (
        "new_run_in_another_runs_folder",
        lambda c, a, t: OmegaConf.update(c, "resume_from_checkpoint", False),
        "resume_from_checkpoint",
        r"false \(a new run\), but .* holds 1 checkpoint\(s\) of another run .*set resume_from_checkpoint=true",
    ),
    (
        "resume_incomplete_path",
        lambda c, a, t: ((t / "half").mkdir(), OmegaConf.update(c, "resume_from_checkpoint", str(t / "half"))),
        "resume_from_checkpoint",
        r"not a complete checkpoint: no manifest",
    ),
]


def test_good_config_has_no_problems(assets, run_dir):
    cfg = tiny_cfg(assets, run_dir, resume_from_checkpoint=True)
    assert validate_config(cfg) == []


@pytest.mark.parametrize("name,mutate,key,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_problem(assets, run_dir, tmp_path, name, mutate, key, pattern):
    # run_dir holds a checkpoint: only a resume may use that folder (a new run there is refused, a case below).
    cfg = tiny_cfg(assets, run_dir, resume_from_checkpoint=True)
    mutate(cfg, assets, tmp_path)
    before = tree_hash(run_dir)
    problems = validate_config(cfg)
    assert len(problems) == 1, [str(p) for p in problems]
    (p,) = problems
    assert p.key == key, str(p)
    assert re.search(pattern, p.message), str(p)
    assert "Traceback" not in p.message and "\n" not in p.message
    assert tree_hash(run_dir) == before  # existing checkpoints and logs untouched
    assert not (tmp_path / "evil" / "PWNED").exists()  # the payload never ran


def test_recipe_refuses_bad_config_before_anything(assets, run_dir):
    """The recipe runs the same checks first: no process group, model or data, nothing written."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    before = tree_hash(run_dir)
    cfg = tiny_cfg(assets, run_dir, epohcs=3, resume_from_checkpoint=True)
    OmegaConf.update(cfg, "kd_loss.beta", -2.0)
    with pytest.raises(ConfigValidationError) as info:
        KDTADRecipe(cfg)
    msg = str(info.value)
    assert "2 problem(s)" in msg and "did you mean 'epochs'" in msg and "kd_loss.beta: must be > 0" in msg
    assert tree_hash(run_dir) == before


def test_cli_prints_one_line_per_problem(assets, run_dir, capsys):
    argv = ["--config", str(TINY_CONFIG), f"assets_dir={assets}", f"output_dir={run_dir}"]
    argv.append("resume_from_checkpoint=true")
    assert main(argv) == 0 and capsys.readouterr().out.strip() == "OK"
    assert main([*argv, "optimizer.lr=0", "kd_loss.topk=3"]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "kd_loss.topk: tad_torchtune.TADLoss has no argument 'topk'; did you mean 'top_k'?",
        "optimizer.lr: must be > 0, got 0; typical values are 1e-6 to 1e-3",
    ]
    assert "Traceback" not in out.err
