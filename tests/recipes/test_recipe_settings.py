"""One config model: `tad-tune validate` and the recipe read the settings through the same parse
(`tad_torchtune.recipe_settings`), so what validation accepts is what the recipe runs with."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tad_torchtune.recipe_settings import FUSED_CHUNK_SIZE, parse_settings, settings_problems
from tad_torchtune.validate import ConfigValidationError, validate_config
from tests.recipes.conftest import tiny_cfg


def test_defaults_are_applied_once_and_typed(tiny_assets, tmp_path):
    cfg = tiny_cfg(tiny_assets, tmp_path / "run")
    for key in ("fused_chunk_size", "keep_last_n_checkpoints", "nonfinite_policy", "progress_bar", "cosine_weight"):
        cfg.pop(key, None)
    s = parse_settings(cfg)
    assert s.loss.fused_chunk_size == FUSED_CHUNK_SIZE
    assert s.checkpointing.keep_last_n_checkpoints == 2
    assert s.nonfinite_policy == "skip" and s.logging.progress_bar is True and s.loss.cosine_weight == 0.0
    assert s.output_dir == Path(cfg.output_dir) and s.loop.batch_size == cfg.batch_size
    assert s.on_policy is not None and s.on_policy.fraction == 0.0
    assert s.student.freeze == () and isinstance(s.student.freeze, tuple)


def test_kd_ratio_is_folded_into_the_weights_and_the_teacher_need(tiny_assets, tmp_path):
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", kd_ratio=0.25)
    for key in ("ce_weight", "kd_weight"):
        cfg.pop(key, None)
    s = parse_settings(cfg)
    assert (s.loss.ce_weight, s.loss.kd_weight) == (0.75, 0.25) and s.loss.uses_live_teacher
    cfg.kd_ratio = 0.0
    assert not parse_settings(cfg).loss.uses_live_teacher


def test_kd_ratio_zero_needs_no_teacher_checkpoint(tiny_assets, tmp_path):
    """Validation asked for a teacher checkpoint whenever kd_weight was unset, even with kd_ratio: 0 (CE only),
    because it read kd_weight's raw default; it now reads the parsed weights like the recipe."""
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", kd_ratio=0.0)
    for key in ("ce_weight", "kd_weight", "teacher_checkpointer"):
        cfg.pop(key, None)
    assert validate_config(cfg, check_data=False) == []


def test_a_switch_the_recipe_alone_used_to_check_is_refused_by_validate(tiny_assets, tmp_path):
    """progress_bar was checked in the recipe's __init__ only: `tad-tune validate` said OK to `progress_bar=maybe`."""
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", progress_bar="maybe")
    problems = validate_config(cfg, check_data=False)
    assert [str(p) for p in problems] == ["progress_bar: must be true or false, got progress_bar='maybe'"]


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"fused_loss": "sometimes"}, "fused_loss", "must be auto, true or false"),
        ({"fused_chunk_size": 0}, "fused_chunk_size", "must be >= 1"),
        ({"dtype": "fp16"}, "dtype", "must be fp32 or bf16"),
        ({"nonfinite_policy": "skp"}, "nonfinite_policy", "did you mean 'skip'"),
        ({"kd_ratio": 0.5, "kd_weight": 1.0}, "kd_ratio", "kd_ratio=0.5 means"),
        ({"on_policy": {"fraction": 1.5}}, "on_policy.fraction", "1.5"),
    ],
)
def test_the_recipe_refuses_exactly_what_validate_reports(tiny_assets, tmp_path, overrides, key, fragment):
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    cfg = tiny_cfg(tiny_assets, tmp_path / "run")
    cfg.merge_with(OmegaConf.create(overrides))
    found = settings_problems(cfg)
    assert [k for k, _ in found] == [key] and fragment in found[0][1]
    with pytest.raises(ConfigValidationError) as info:
        KDTADRecipe(cfg)
    assert [p.key for p in info.value.problems] == [key]
    assert not (tmp_path / "run").exists()


def test_fused_loss_spellings(tiny_assets, tmp_path):
    cfg = tiny_cfg(tiny_assets, tmp_path / "run")
    for value, mode in ((True, "true"), (False, "false"), ("AUTO", "auto"), (" false ", "false")):
        cfg.fused_loss = value
        assert parse_settings(cfg).loss.fused_mode == mode


def test_the_recipe_runs_with_the_parsed_settings(tiny_assets, tmp_path):
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    cfg = tiny_cfg(tiny_assets, tmp_path / "run", kd_ratio=0.5, resume_from_checkpoint=False)
    cfg.pop("ce_weight", None)
    cfg.pop("kd_weight", None)
    recipe = KDTADRecipe(cfg)
    try:
        assert recipe.settings == parse_settings(cfg)
    finally:
        recipe.cleanup()


def test_null_means_the_default_except_where_null_has_a_meaning(tiny_assets, tmp_path):
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", log_every_n_steps=None, fused_loss=None, keep_last_n_checkpoints=None)
    s = parse_settings(cfg)
    assert s.logging.log_every_n_steps == 1 and s.loss.fused_mode == "auto"
    assert s.checkpointing.keep_last_n_checkpoints is None  # null keeps every step checkpoint (docs/recipe.md)
    cfg.resume_from_checkpoint = "/some/step_0000002"
    assert parse_settings(cfg).checkpointing.resume_from_checkpoint == "/some/step_0000002"
