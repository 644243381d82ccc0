"""Each start-up check called on its own, beside its subject, finds what ``validate_config`` reports for it."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from tad_torchtune.checkpoint.checks import checkpointer_problems, resume_problems
from tad_torchtune.checkpoint.steps import save_step_checkpoint
from tad_torchtune.data.checks import build_datasets, dataset_size_problems, tokenizer_problems
from tad_torchtune.models.checks import build_on_meta, model_vocab, size_problems
from tad_torchtune.reliability.run_identity import output_dir_problems
from tad_torchtune.validate import validate_config
from tests.reliability.conftest import tiny_cfg


def _validated(cfg) -> list[tuple[str, str]]:
    return [(p.key, p.message) for p in validate_config(cfg, world_size=1, check_lock=False)]


def test_model_and_checkpoint_checks_alone_match_validate(assets, tmp_path):
    cfg = tiny_cfg(assets, tmp_path / "out", **{"model.intermediate_dim": 96, "kd_loss.top_k": 259})
    models, built = build_on_meta(cfg)
    assert built == [] and sorted(models) == ["model", "teacher_model"] and model_vocab(models["model"]) == 259
    alone = size_problems(cfg, models, uses_teacher=True)
    alone += checkpointer_problems(cfg, models, uses_teacher=True)
    assert [k for k, _ in alone] == ["kd_loss.top_k", "checkpointer.checkpoint_files"]
    assert "file (128, 64) vs model (96, 64)" in alone[1][1]
    assert alone == _validated(cfg)


def test_data_checks_alone_match_validate(assets, tmp_path):
    cfg = tiny_cfg(assets, tmp_path / "out", batch_size=100)
    tokenizer, problems = tokenizer_problems(cfg, student_vocab=259)
    assert problems == [] and tokenizer is not None
    parts, problems = build_datasets(cfg, tokenizer)
    assert problems == [] and sum(len(p) for p in parts) == 64
    alone = dataset_size_problems(cfg, parts, world_size=1)
    assert [k for k, _ in alone] == ["dataset"] and "has 64 samples but one optimizer step needs 100" in alone[0][1]
    assert alone == _validated(cfg)
    assert tokenizer_problems(cfg, student_vocab=200)[1][0][1].startswith("the tokenizer has 259 ids")


def test_output_and_resume_checks_alone_match_validate(assets, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = tiny_cfg(assets, tmp_path / "afile" / "run")
    alone = output_dir_problems(cfg.output_dir)
    assert alone == [
        ("output_dir", f"{tmp_path / 'afile' / 'run'} cannot be created: {tmp_path / 'afile'} is a file, not a folder")
    ]
    assert alone == _validated(cfg)
    out = tmp_path / "taken"
    save_step_checkpoint(out / "checkpoints", 2, {"w": torch.ones(3)}, {"state": {}}, {"global_step": 2})
    cfg = tiny_cfg(assets, out)
    notes: list[str] = []
    alone = resume_problems(cfg, 1, notes)
    assert [k for k, _ in alone] == ["resume_from_checkpoint"] and "holds 1 checkpoint(s) of another run" in alone[0][1]
    assert alone == _validated(cfg)
    cfg.resume_from_checkpoint = True
    assert resume_problems(cfg, 1, notes) == [] and notes == [
        f"{out / 'checkpoints' / 'step_0000002'} predates recorded run configs: the config was not compared with it"
    ]


def test_output_dir_and_resume_values(tmp_path):
    assert output_dir_problems(None) == [("output_dir", "is required")]
    assert output_dir_problems(tmp_path / "new" / "run") == []  # created by the run; its parent is writable
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "resume_from_checkpoint": 5})
    assert resume_problems(cfg, 1, []) == [
        ("resume_from_checkpoint", "must be true, false or a checkpoint folder, got 5")
    ]
