"""`tad-tune flops` and `tad-tune plan` count the loss the recipe computes, on the path it takes:
`planning.loss_plan.plan_loss` asks the recipe's own rule (training.loss_path) on meta-device models."""

from __future__ import annotations

import pytest

from tad_torchtune.planning.loss_plan import plan_loss
from tad_torchtune.planning.memory import estimate_memory
from tests.recipes.conftest import tiny_cfg

RKL = {"_component_": "tad_torchtune.ReverseKLLoss", "num_output_chunks": 4}


@pytest.mark.parametrize(
    ("overrides", "kind", "fused"),
    [
        ({}, "tad", True),
        ({"kd_loss": RKL}, "kl", False),
        ({"fused_loss": False}, "tad", False),
        ({"kd_weight": 0.0}, "ce", False),
        ({"kd_ratio": 0.0, "ce_weight": 1.0, "kd_weight": 0.0}, "ce", False),
    ],
    ids=["tad", "reverse_kl", "fused_off", "ce_only", "kd_ratio_0"],
)
def test_the_plan_takes_the_recipes_path(tiny_assets, tmp_path, overrides, kind, fused):
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    cfg = tiny_cfg(tiny_assets, tmp_path / "run")
    for key, value in overrides.items():
        cfg[key] = value  # replaces a node (kd_loss) rather than merging into it
    plan = plan_loss(cfg)
    assert (plan.kind, plan.fused) == (kind, fused)
    assert (plan.why_not_fused == "") == fused
    recipe = KDTADRecipe(cfg)
    try:
        recipe.setup(cfg)
        assert (recipe.fused_loss is not None) == plan.fused
        assert recipe.loss_path.startswith("loss path: fused" if fused else "loss path: chunked")
        if not fused:
            assert plan.why_not_fused in recipe.loss_path
    finally:
        recipe.cleanup()


def test_a_teacher_cache_run_is_planned_without_teacher(tiny_assets, tmp_path):
    """The old FLOP rule read only kd_loss's class name: a cache-fed run was counted as fused TAD with a
    teacher forward, and the memory plan budgeted the teacher's weights the run never loads."""
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", teacher_cache=str(tmp_path / "cache"))
    plan = plan_loss(cfg)
    assert (plan.kind, plan.fused, plan.teacher_loaded) == ("ce", False, False)
    assert "teacher_cache" in plan.why_not_fused
    memory = estimate_memory(cfg, seq_len=48)
    assert "teacher weights" not in memory.parts and "fused loss" not in memory.parts
    with_teacher = estimate_memory(tiny_cfg(tiny_assets, tmp_path / "live"), seq_len=48)
    assert with_teacher.parts["teacher weights"] > 0
