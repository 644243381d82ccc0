"""Numerical guards: NaN/inf injected into teacher logits, student logits, the loss and the gradients.

Each injection is caught at the step it happens; ``skip`` takes no optimizer step (weights and AdamW state
unchanged) and counts it, ``stop`` raises a report naming the step, the tensor and the batch's first tokens.
"""

from __future__ import annotations

import pytest
import torch

from tad_torchtune.reliability.guards import NonFiniteError, NonFiniteGuard
from tests.reliability.conftest import tiny_cfg

PLACES = ("teacher_logits", "student_logits", "loss", "gradients")


def _poison(x: torch.Tensor, value: float) -> torch.Tensor:
    bump = torch.zeros_like(x)
    bump.view(-1)[0] = value
    return x + bump  # out of place: the autograd graph stays intact


def _inject(recipe, place: str, step: int, value: float, seen_tokens: dict[int, torch.Tensor]):
    """Registers a hook that poisons ``place`` during global step ``step`` (1-based)."""

    def now() -> bool:
        return recipe.global_step + 1 == step

    def record_tokens(module, args, kwargs, out):
        seen_tokens.setdefault(recipe.global_step + 1, args[0].detach().clone())

    recipe.student.register_forward_hook(record_tokens, with_kwargs=True)
    if place == "teacher_logits":
        recipe.teacher.register_forward_hook(lambda m, a, out: [_poison(out[0], value), *out[1:]] if now() else None)
    elif place == "student_logits":
        recipe.student.register_forward_hook(lambda m, a, out: [_poison(out[0], value), *out[1:]] if now() else None)
    elif place == "loss":
        recipe.kd_loss.register_forward_hook(lambda m, a, out: out + value if now() else None)
    else:
        p = recipe.student.layers[0].attn.q_proj.weight
        p.register_hook(lambda g: _poison(g, value) if now() else g)


def _prepare(cfg):
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    recipe = KDTADRecipe(cfg)
    recipe.setup(cfg)
    snaps: list[dict[str, torch.Tensor]] = []
    zero_grad = recipe.optimizer.zero_grad

    def snapshot_and_zero_grad(*args, **kwargs):  # called once before training and once after every step
        snaps.append({k: v.detach().clone() for k, v in recipe.student.state_dict().items()})
        return zero_grad(*args, **kwargs)

    recipe.optimizer.zero_grad = snapshot_and_zero_grad
    return recipe, snaps


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _adam_steps(recipe) -> set[float]:
    return {float(s["step"]) for s in recipe.optimizer.state.values()}


def test_skip_policy_catches_each_place_and_never_steps_on_nan(assets, tmp_path):
    # Steps 2..5 are each poisoned in one place (NaN or inf); steps 1 and 6 are clean.
    plan = {2: ("teacher_logits", float("nan")), 3: ("student_logits", float("inf")),
            4: ("loss", float("nan")), 5: ("gradients", float("-inf"))}  # fmt: skip
    # fused_loss: false: the injections poison logits and TADLoss.forward, which only the chunked-logits path has
    # (the fused path's guard is tested in tests/recipes/test_fused_recipe.py).
    cfg = tiny_cfg(assets, tmp_path / "run", max_steps_per_epoch=6, save_every_n_steps=None, nonfinite_policy="skip")
    cfg.fused_loss = False
    recipe, snaps = _prepare(cfg)
    tokens: dict[int, torch.Tensor] = {}
    for step, (place, value) in plan.items():
        _inject(recipe, place, step, value, tokens)
    reports = {}
    check = recipe._guard.before_optimizer_step

    def record(step, grad_norm, micro):
        ok = check(step, grad_norm, micro)
        reports[step] = None if ok else recipe.guard.last_report
        return ok

    recipe._guard.before_optimizer_step = record
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    assert recipe.guard.skipped_steps == [2, 3, 4, 5]
    assert reports[1] is None and reports[6] is None
    for step, (place, _) in plan.items():
        assert f"step {step}: first in {place}" in reports[step], reports[step]
        assert str(tokens[step][0, :16].tolist()) in reports[step]
        assert _same(snaps[step], snaps[step - 1]), f"weights moved on skipped step {step}"
    assert not _same(snaps[6], snaps[5])  # a clean step does update (step 1 has lr 0: warmup)
    assert _adam_steps(recipe) == {2.0}  # AdamW stepped twice: its state never saw a NaN
    assert all(torch.isfinite(v).all() for v in recipe.student.state_dict().values())
    assert [m["nonfinite_skipped_steps"] for m in recipe.metrics_history] == [0, 1, 2, 3, 4, 4]


@pytest.mark.parametrize("place", PLACES)
def test_stop_policy_reports_step_tensor_and_tokens(assets, tmp_path, place):
    cfg = tiny_cfg(assets, tmp_path / "run", max_steps_per_epoch=2, save_every_n_steps=None, nonfinite_policy="stop")
    cfg.fused_loss = False  # logits exist on the chunked path only (see above)
    recipe, snaps = _prepare(cfg)
    tokens: dict[int, torch.Tensor] = {}
    _inject(recipe, place, 2, float("nan"), tokens)
    try:
        with pytest.raises(NonFiniteError) as info:
            recipe.train()
    finally:
        recipe.cleanup()
    msg = str(info.value)
    assert f"non-finite values at step 2: first in {place}" in msg
    assert f"batch's first tokens (row 0): {tokens[2][0, :16].tolist()}" in msg
    assert recipe.global_step == 1 and len(snaps) == 2  # stopped inside step 2, before its update
    assert _same({k: v for k, v in recipe.student.state_dict().items()}, snaps[1])
    assert _adam_steps(recipe) == {1.0}


def test_guard_unit_detection_is_per_tensor():
    guard = NonFiniteGuard("skip")
    micro = [{"tokens": torch.arange(20).view(1, 20)}]
    guard.watch("teacher_logits", [torch.zeros(1, 2, 3), torch.zeros(1, 0, 3)])
    guard.watch("student_logits", [torch.zeros(1, 2, 3), torch.tensor([[[0.0, float("inf"), 0.0]]])])
    guard.watch("loss", torch.tensor(float("nan")))
    assert guard.before_optimizer_step(7, torch.tensor(1.0), micro) is False
    assert guard.last_report.startswith("non-finite values at step 7: first in student_logits (micro-batch 0)")
    assert "non-finite: student_logits, loss" in guard.last_report and str(list(range(16))) in guard.last_report
    guard.watch("loss", torch.tensor(1.0))
    assert guard.before_optimizer_step(8, torch.tensor(2.0), micro) is True  # flags reset every step
    assert guard.skipped == 1
    with pytest.raises(ValueError, match="nonfinite_policy must be one of"):
        NonFiniteGuard("ignore")


def test_first_nonfinite_names_the_tensor_and_ignores_large_finite_values():
    from tad_torchtune.reliability.guards import first_nonfinite

    state = {"a": torch.ones(3, 4), "opt": {"state": {0: {"exp_avg": torch.full((5,), 3e38)}}}, "n": torch.arange(3)}
    assert first_nonfinite(state) is None  # the fp32 sum overflows, the values are finite
    state["opt"]["state"][0]["exp_avg"][2] = float("-inf")
    assert first_nonfinite(state) == "'opt.state.0.exp_avg' has 0 NaN and 1 inf of 5 values (first at index (2,))"
    state["a"][1, 2] = float("nan")
    assert first_nonfinite(state) == "'a' has 1 NaN and 0 inf of 12 values (first at index (1, 2))"
    assert first_nonfinite({"b": torch.ones(2, dtype=torch.bfloat16)}) is None
