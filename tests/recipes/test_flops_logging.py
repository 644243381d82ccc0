"""The recipe's FLOP accounting: ``flops_per_token``, ``tflops_per_second_per_gpu`` and ``mfu`` per step.

``flops_per_token`` must equal :func:`estimate_flops_per_token` (itself checked against torch's FlopCounterMode in
``tests/planning/test_flops.py``) for the run's models, loss kind, path and each micro-batch's padded length; the
other two follow from the step's valid tokens, its time and the peak (config, or the matmul probe, run once).
The two-process FSDP2 run is checked in ``test_launch.py::test_two_processes_match_one_and_resume``.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import tad_torchtune.recipes.kd_tad as kd_tad
from tad_torchtune.planning.flops import KNOWN_PEAKS, estimate_flops_per_token
from tad_torchtune.recipes.kd_tad import KDTADRecipe
from tests.recipes.conftest import read_disk_log, run_in_process, tiny_cfg
from tests.recipes.test_kd_tad import RECORDED_GRAD_NORM

pytestmark = pytest.mark.integration_test

FLOP_KEYS = ("flops_per_token", "tflops_per_second_per_gpu", "mfu")


def _record_batches(monkeypatch) -> list[tuple[int, int]]:
    """(valid tokens, padded length) of every micro-batch the recipe prepares, in order."""
    seen: list[tuple[int, int]] = []
    prepare = KDTADRecipe._prepare_batch

    def recording(self, batch):
        out = prepare(self, batch)
        seen.append((int((out["labels"] != self._ignore_index).sum()), out["tokens"].size(1)))
        return out

    monkeypatch.setattr(KDTADRecipe, "_prepare_batch", recording)
    return seen


def _no_probe(*args, **kwargs):
    raise AssertionError("measure_matmul_peak must not run when peak_flops is configured")


def _estimate(cfg, seq_len: int, loss: str, fused: bool, teacher: bool = True, chunk: int | None = None) -> float:
    student = OmegaConf.to_container(cfg.model, resolve=True)
    t = OmegaConf.to_container(cfg.teacher_model, resolve=True) if teacher else None
    return estimate_flops_per_token(student, t, seq_len, loss=loss, fused=fused, fused_chunk_size=chunk).total


def _check_identities(m: dict[str, float], peak: float) -> None:
    # tflops = tokens/s x FLOPs per token (valid tokens, as tokens_per_second_per_gpu counts them); mfu = it / peak.
    achieved = m["tflops_per_second_per_gpu"] * 1e12
    assert achieved == pytest.approx(m["tokens_per_second_per_gpu"] * m["flops_per_token"], rel=1e-12)
    assert m["mfu"] == pytest.approx(achieved / peak, rel=1e-12)


def test_chunked_accumulated_steps_log_flops_with_configured_peak(tiny_assets, tmp_path, monkeypatch):
    """Chunked TAD, two micro-batches per step: the token-weighted count per padded length; the named peak;
    no probe; the same numbers in the DiskLogger file."""
    monkeypatch.setattr(kd_tad, "measure_matmul_peak", _no_probe)
    seen = _record_batches(monkeypatch)
    cfg = tiny_cfg(
        tiny_assets,
        tmp_path / "run",
        fused_loss=False,
        batch_size=2,
        gradient_accumulation_steps=2,
        max_steps_per_epoch=3,
        save_every_n_steps=None,
        peak_flops="h100_sxm",  # KNOWN_PEAKS["h100-sxm"]; "_" and "-" both accepted
    )
    recipe = run_in_process(cfg)
    assert recipe._peak_flops == KNOWN_PEAKS["h100-sxm"]
    assert len(recipe.metrics_history) == 3 and len(seen) == 6
    for step, m in enumerate(recipe.metrics_history):
        micro = seen[2 * step : 2 * step + 2]
        flops = sum(n * _estimate(cfg, s, "tad", fused=False) for n, s in micro)
        assert m["flops_per_token"] == pytest.approx(flops / sum(n for n, _ in micro), rel=1e-12)
        _check_identities(m, KNOWN_PEAKS["h100-sxm"])
    assert len({s for _, s in seen}) > 1  # the batches really had different padded lengths
    for row, m in zip(read_disk_log(tmp_path / "run"), recipe.metrics_history, strict=True):
        for key in FLOP_KEYS:
            assert row[key] == pytest.approx(m[key], rel=1e-12), key


def test_probe_runs_once_without_peak_fused_default(tiny_assets, tmp_path, monkeypatch):
    """No peak_flops: one probe on the recipe's device and dtype; the fused TAD count (whole rows in 1024-token
    slices: one teacher pass); without clipping the logged norm is still the pre-clip norm."""
    calls = []

    def probe(device, dtype):
        calls.append((str(device), dtype))
        return 2.5e12

    monkeypatch.setattr(kd_tad, "measure_matmul_peak", probe)
    seen = _record_batches(monkeypatch)
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=2, save_every_n_steps=None, clip_grad_norm=None)
    recipe = run_in_process(cfg)
    assert recipe.fused_loss is not None
    assert calls == [("cpu", torch.float32)]
    for (_, s), m in zip(seen, recipe.metrics_history, strict=True):
        fused = _estimate(cfg, s, "tad", fused=True, chunk=1024)
        assert m["flops_per_token"] == pytest.approx(fused, rel=1e-12)
        # One teacher pass; its 5 extra vocabulary rows are cut before the projection (D = 64).
        assert fused - _estimate(cfg, s, "tad", fused=False) == -2 * 64 * (264 - 259)
        _check_identities(m, 2.5e12)
    assert recipe.metrics_history[0]["grad_norm"] == pytest.approx(RECORDED_GRAD_NORM[0], rel=1e-5)


_FUSED_TAD_16 = {"_component_": "tad_torchtune.losses.fused_linear.FusedLinearTADLoss", "top_k": 10, "chunk_size": 16}


@pytest.mark.parametrize(
    "overrides,loss,teacher,chunk",
    [
        ({"kd_loss": {"_component_": "tad_torchtune.ForwardKLLoss", "num_output_chunks": 4}}, "kl", True, 1024),
        ({"kd_weight": 0.0}, "ce", False, None),
        ({"kd_loss": _FUSED_TAD_16}, "tad", True, 16),
    ],
    ids=["forward_kl", "ce_only", "fused_tad_16_token_slices"],
)
def test_loss_kind_follows_the_config(tiny_assets, tmp_path, monkeypatch, overrides, loss, teacher, chunk):
    """Forward KL counts the KL loss; kd_weight 0 the student alone (the teacher is not loaded); fused TAD with
    16-token slices cuts rows longer than 16 and counts the second teacher projection for them."""
    monkeypatch.setattr(kd_tad, "measure_matmul_peak", _no_probe)
    seen = _record_batches(monkeypatch)
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=1, save_every_n_steps=None, peak_flops=1e12)
    for key, value in overrides.items():
        cfg[key] = value
    recipe = run_in_process(cfg)
    (_, s), m = seen[0], recipe.metrics_history[0]
    fused = recipe.fused_loss is not None
    expected = _estimate(cfg, s, loss, fused=fused, teacher=teacher, chunk=chunk)
    assert m["flops_per_token"] == pytest.approx(expected, rel=1e-12)
    if chunk == 16:
        assert s > 16 and expected - _estimate(cfg, s, loss, fused=True, chunk=1024) == 2 * 64 * 259
    _check_identities(m, 1e12)


def test_log_flops_false_turns_it_off(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(kd_tad, "measure_matmul_peak", _no_probe)
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=1, save_every_n_steps=None, log_flops=False)
    recipe = run_in_process(cfg)
    assert not set(FLOP_KEYS) & set(recipe.metrics_history[0])
    assert "tokens_per_second_per_gpu" in recipe.metrics_history[0]


def test_a_model_the_count_cannot_describe_trains_without_flop_metrics(tiny_assets, tmp_path, monkeypatch, caplog):
    def unknown(*args, **kwargs):
        raise ValueError("cannot tell the architecture of model._component_='my.decoder'")

    monkeypatch.setattr(kd_tad, "FlopsPerToken", unknown)
    monkeypatch.setattr(kd_tad, "measure_matmul_peak", _no_probe)
    cfg = tiny_cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=1, save_every_n_steps=None)
    with caplog.at_level("WARNING"):
        recipe = run_in_process(cfg)
    assert "FLOP metrics off: cannot tell the architecture" in caplog.text
    assert not set(FLOP_KEYS) & set(recipe.metrics_history[0]) and recipe.metrics_history[0]["loss"] > 0


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("peak_flops", -1.0, r"peak_flops=-1.0 must be a finite FLOP/s value > 0"),
        ("peak_flops", 0, r"peak_flops=0 must be"),
        ("peak_flops", "nan", r"peak_flops='nan' must be"),
        ("peak_flops", "a100s", r"peak_flops='a100s' is neither a number nor a known device"),
        ("peak_flops", "12 TFLOPs", r"peak_flops='12 TFLOPs' is neither"),
        ("peak_flops", True, r"peak_flops=True is not a FLOP/s value"),
        ("log_flops", "yes", r"log_flops: must be true or false, got log_flops='yes'"),
    ],
)
def test_bad_values_raise_before_anything_is_built(tiny_assets, tmp_path, monkeypatch, key, value, match):
    """Rejected by the constructor: no model, data or probe yet; the message says how to fix it."""
    monkeypatch.setattr(kd_tad, "measure_matmul_peak", _no_probe)
    cfg = tiny_cfg(tiny_assets, tmp_path / "bad", **{key: value})
    with pytest.raises(ValueError, match=match) as err:
        KDTADRecipe(cfg)
    if key == "peak_flops":
        assert "989e12" in str(err.value) and "null to measure" in str(err.value)


def test_finite_probe_of_logit_chunks():
    """The guard's cheap logit check (one fp32 sum per chunk): non-finite iff some logit is; NaN and ±inf in
    any chunk, even +inf and -inf in different chunks, are caught; large finite logits are not flagged."""
    chunks = [torch.randn(2, 3, 7), torch.randn(2, 1, 7).bfloat16(), torch.full((2, 2, 7), 1e30)]
    probe = kd_tad._finite_probe(chunks)
    assert probe.dtype == torch.float32 and probe.dim() == 0 and torch.isfinite(probe)
    for poison in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        bad = [c.clone() for c in chunks]
        for i, value in enumerate(poison):
            bad[i][1, 0, 3] = value
        assert not torch.isfinite(kd_tad._finite_probe(bad)), poison
    student = torch.randn(1, 2, 5, requires_grad=True)
    assert not kd_tad._finite_probe([student]).requires_grad  # no graph through the check
