"""The recipe's ``fused_loss`` switch: the fused path (hidden states + output weights, no logits) trains exactly
like the chunked-logits path, is the default where it applies, and refuses clearly where it does not.

The two-process FSDP2 run of the default config (fused under ``auto``) is compared with one process in
``test_launch.py::test_two_processes_match_one_and_resume``.
"""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from tad_torchtune.losses.fused_linear import FusedLinearDistillationLoss
from tests.recipes.conftest import run_in_process, tiny_cfg

pytestmark = pytest.mark.integration_test

# Timing and memory differ between the paths by design; everything else must agree.
_NOT_COMPARED = (
    "tokens_per_second_per_gpu",
    "tflops_per_second_per_gpu",
    "mfu",
    "flops_per_token",  # the fused path counts its recompute of the teacher projection (test_flops_logging.py)
    "peak_rss_gib",
    "peak_memory_alloc_gib",
    "peak_memory_reserved_gib",
)


def _cfg(assets, out, kd_loss: dict | None = None, **overrides):
    """``tiny_cfg`` with ``kd_loss`` replaced (not merged into the TAD node)."""
    cfg = tiny_cfg(assets, out, **overrides)
    if kd_loss is not None:
        cfg.kd_loss = OmegaConf.create(kd_loss)
    return cfg


# The two paths are compared under plain SGD: Adam divides by sqrt(v), so where a gradient is near zero its
# last-bit rounding becomes an lr-sized step, and parameter equality after Adam says nothing about the
# gradients (1.9e-5 on a bias after 3 AdamW steps, depending on the CPU's kernels). Under SGD a parameter
# moves by lr * grad, so the students agree to lr * (the summed gradient tolerance).
_LR, _STEPS = 1e-2, 3
_SGD = {"_component_": "torch.optim.SGD", "lr": _LR, "weight_decay": 0.0}
_GRAD_RTOL, _GRAD_ATOL = 1e-5, 1e-7


def _run(assets, out, fused, **overrides):
    """Runs ``_STEPS`` SGD steps; the recipe gets ``applied_grads``: each step's gradients in parameter order."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    grads: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    handle = register_optimizer_step_pre_hook(record)
    try:
        cfg = _cfg(assets, out, max_steps_per_epoch=_STEPS, save_every_n_steps=None, fused_loss=fused, **overrides)
        cfg.optimizer = OmegaConf.create(_SGD)
        recipe = run_in_process(cfg)
    finally:
        handle.remove()
    recipe.applied_grads = grads
    return recipe


def _assert_same_training(chunked, fused):
    assert chunked.fused_loss is None and isinstance(fused.fused_loss, FusedLinearDistillationLoss)
    assert len(chunked.metrics_history) == len(fused.metrics_history) == _STEPS
    for a, b in zip(chunked.metrics_history, fused.metrics_history, strict=True):
        assert set(a) == set(b)  # same metric keys: losses, the divergence's statistics, grad_norm...
        for key in set(a) - set(_NOT_COMPARED):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    # The gradient every step applied, parameter by parameter: under SGD, the step's whole effect.
    names = [n for n, _ in chunked.student.named_parameters()]
    assert len(chunked.applied_grads) == len(fused.applied_grads) == _STEPS
    bounds = dict.fromkeys(names, 0.0)
    for step, (gc, gf) in enumerate(zip(chunked.applied_grads, fused.applied_grads, strict=True), start=1):
        assert len(gc) == len(gf) == len(names)
        for name, a, b in zip(names, gc, gf, strict=True):
            tol = _GRAD_RTOL * a.abs().max().item() + _GRAD_ATOL
            err = (a - b).abs().max().item()
            assert err <= tol, f"step {step} {name}: max |grad difference| {err:.3g} > {tol:.3g}"
            bounds[name] += _LR * tol
    # Hence the students: a parameter differs by at most lr * its summed gradient tolerance (+ fp32 rounding).
    sd_c, sd_f = chunked.student.state_dict(), fused.student.state_dict()
    for name in names:
        assert (sd_c[name] - sd_f[name]).abs().max().item() <= bounds[name] + 1e-7, name


def test_fused_tad_matches_chunked_and_is_the_default(tiny_assets, tmp_path):
    """TAD, teacher vocabulary 264 > student 259 (cut): auto (the default) = fused = chunked, per step."""
    chunked = _run(tiny_assets, tmp_path / "chunked", False)
    fused = _run(tiny_assets, tmp_path / "fused", "auto")
    _assert_same_training(chunked, fused)
    assert fused.teacher.output.weight.size(0) > fused.student.output.weight.size(0)
    assert {"alpha_t_mean", "w_mean", "dkl1_mean", "tail_mean", "topk_overlap_mean"} <= set(fused.metrics_history[0])
    assert OmegaConf.load("configs/tiny_cpu.yaml").fused_loss == "auto"


def test_fused_kd_loss_component_with_small_slices(tiny_assets, tmp_path):
    """A ``FusedLinearTADLoss`` kd_loss (16-token slices: many per micro-batch) trains like ``TADLoss``."""
    chunked = _run(tiny_assets, tmp_path / "chunked", False)
    node = {"_component_": "tad_torchtune.losses.fused_linear.FusedLinearTADLoss", "top_k": 10, "beta": 2.0}
    fused = _run(tiny_assets, tmp_path / "fused", True, kd_loss={**node, "chunk_size": 16})
    assert fused.fused_loss.chunk_size == 16
    _assert_same_training(chunked, fused)


def test_fused_chunk_size_cuts_rows_and_trains_the_same(tiny_assets, tmp_path):
    """``fused_chunk_size: 16`` with a plain TADLoss: rows (up to 48 positions) are cut across slices, so TAD
    takes its two-pass schedule; training still equals the chunked-logits path. A bad value is refused."""
    chunked = _run(tiny_assets, tmp_path / "chunked", False)
    fused = _run(tiny_assets, tmp_path / "fused", "auto", fused_chunk_size=16)
    assert fused.fused_loss.chunk_size == 16 and "16 tokens per slice" in fused.loss_path
    _assert_same_training(chunked, fused)
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    for bad in (0, 2.5, "big", True):
        with pytest.raises(ValueError, match=r"fused_chunk_size.*(integer|>= 1).*" + re.escape(repr(bad))):
            KDTADRecipe(_cfg(tiny_assets, tmp_path / "bad", fused_chunk_size=bad))


def test_fused_forward_kl_tied_student_cosine_accumulation(tiny_assets, tmp_path):
    """Forward KL, a tied-embedding random-init student, the cosine hidden-state term, 2 micro-batches."""
    overrides = {
        "kd_loss": {"_component_": "tad_torchtune.ForwardKLLoss", "num_output_chunks": 4},
        "checkpointer": None,
        "model.tie_word_embeddings": True,
        "cosine_weight": 0.5,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
    }
    chunked = _run(tiny_assets, tmp_path / "chunked", False, **overrides)
    fused = _run(tiny_assets, tmp_path / "fused", True, **overrides)
    assert hasattr(fused.student.output, "tied_module")
    assert fused.metrics_history[0]["cosine_loss"] > 0
    _assert_same_training(chunked, fused)


def _setup_error(cfg) -> str:
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    recipe = None
    try:
        with pytest.raises(ValueError) as info:
            recipe = KDTADRecipe(cfg)
            recipe.setup(cfg)
    finally:
        if recipe is not None:
            recipe.cleanup()
    return str(info.value)


def test_fused_loss_true_where_it_cannot_apply_is_a_clear_error(tiny_assets, tmp_path):
    rkl = {"_component_": "tad_torchtune.ReverseKLLoss", "num_output_chunks": 4}
    msg = _setup_error(_cfg(tiny_assets, tmp_path / "a", fused_loss=True, kd_loss=rkl))
    assert "fused_loss: true" in msg and "kd_loss is ReverseKLLoss" in msg
    msg = _setup_error(_cfg(tiny_assets, tmp_path / "b", fused_loss=True, kd_weight=0.0))
    assert "kd_weight is 0" in msg
    fused_node = {"_component_": "tad_torchtune.losses.fused_linear.FusedLinearForwardKLLoss"}
    msg = _setup_error(_cfg(tiny_assets, tmp_path / "c", fused_loss=False, kd_loss=fused_node))
    assert "fused_loss: false" in msg and "FusedLinearForwardKLLoss" in msg
    msg = _setup_error(_cfg(tiny_assets, tmp_path / "d", fused_loss="sometimes"))
    assert "fused_loss" in msg and "must be auto, true or false" in msg and "sometimes" in msg


def test_auto_falls_back_to_chunked_for_other_divergences(tiny_assets, tmp_path):
    rkl = {"_component_": "tad_torchtune.ReverseKLLoss", "num_output_chunks": 4}
    cfg = _cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=1, save_every_n_steps=None, kd_loss=rkl)
    recipe = run_in_process(cfg)
    assert recipe.fused_loss is None and "ReverseKLLoss" in recipe.loss_path
    assert recipe.metrics_history[0]["kd_loss"] > 0


def test_guard_catches_nonfinite_teacher_on_the_fused_path(tiny_assets, tmp_path):
    """No logits exist on the fused path: a NaN teacher hidden state reaches the loss or the gradients (the
    guard's later checkpoints), and the step is skipped."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    cfg = _cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=3, save_every_n_steps=None, fused_loss=True)
    recipe = KDTADRecipe(cfg)
    try:
        recipe.setup(cfg)
        # final_hidden_states runs the teacher's norm as its head: poison its output during step 2.
        recipe.teacher.norm.register_forward_hook(
            lambda m, a, out: out * float("nan") if recipe.global_step + 1 == 2 else None
        )
        recipe.train()
    finally:
        recipe.cleanup()
    assert recipe.guard.skipped_steps == [2]
    assert recipe.guard.last_report.startswith("non-finite values at step 2: first in ")
    assert [m["nonfinite_skipped_steps"] for m in recipe.metrics_history] == [0, 1, 1]


def test_only_plain_output_heads_are_fused():
    """One answer for the recipe and the fused loss: soft-capped (Gemma-2) or otherwise overridden heads change
    the logits and are never fused, even when tied; FSDP2's dynamic subclasses (no forward of their own) are."""
    from types import SimpleNamespace

    import torch
    from torchtune.modules import TiedLinear

    from tad_torchtune.losses.fused_linear import is_plain_projection, output_projection
    from tad_torchtune.models.gemma2 import SoftcappedTiedLinear

    class Capped(torch.nn.Linear):
        def forward(self, x):
            return 30 * torch.tanh(super().forward(x) / 30)

    class FSDPLinear(torch.nn.Linear):  # what fully_shard swaps in: a subclass with no forward of its own
        pass

    class FSDPTiedLinear(TiedLinear):
        pass

    emb = torch.nn.Embedding(11, 4)
    plain = [torch.nn.Linear(4, 11), FSDPLinear(4, 11), TiedLinear(emb), FSDPTiedLinear(emb)]
    transformed = [SoftcappedTiedLinear(emb, 30.0), Capped(4, 11), None]
    for head in plain:
        assert is_plain_projection(head), type(head).__name__
        weight, _ = output_projection(SimpleNamespace(output=head))
        assert weight.shape == (11, 4)
    for head in transformed:
        assert not is_plain_projection(head), type(head).__name__
        with pytest.raises(ValueError, match="plain nn.Linear or TiedLinear"):
            output_projection(SimpleNamespace(output=head))


def test_fused_path_with_sharded_output_layers_two_processes(tiny_assets, tmp_path):
    """FSDP2 with ``custom_sharded_layers: [tok_embeddings, output]`` (docs/recipe.md's example for large
    vocabularies) makes the student's head its own FSDP unit, whose weight the fused loss never sees whole: the
    recipe logged "loss path: fused" and then crashed at the first step. ``auto`` now takes the chunked path
    and says why, and trains like one process."""
    from tests.recipes.conftest import read_disk_log, run_cli

    out = tmp_path / "two"
    cmd = ["tune", "run", "--nproc_per_node", "2", "tad_torchtune.recipes.kd_tad", "--config", "configs/tiny_cpu.yaml"]
    extra = [
        "batch_size=2",
        "max_steps_per_epoch=2",
        "save_every_n_steps=null",
        "custom_sharded_layers=[tok_embeddings,output]",
    ]
    proc = run_cli(cmd + [f"assets_dir={tiny_assets}", f"output_dir={out}", *extra])
    log = proc.stdout + proc.stderr
    assert "loss path: fused" not in log and "student's output is sharded on its own" in log
    two = read_disk_log(out)
    one = run_in_process(tiny_cfg(tiny_assets, tmp_path / "one", max_steps_per_epoch=2, save_every_n_steps=None))
    assert len(two) == 2
    for r, m in zip(two, one.metrics_history, strict=True):
        for key in ("loss", "kd_loss", "grad_norm"):
            assert r[key] == pytest.approx(m[key], rel=1e-5, abs=1e-6), key
