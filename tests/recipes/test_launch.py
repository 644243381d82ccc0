"""Every documented launch form runs the tiny config through the real CLI (subprocesses, CPU, gloo)."""

from __future__ import annotations

import shutil
import sys

import pytest
from omegaconf import OmegaConf

from tad_torchtune.planning.flops import estimate_flops_per_token
from tests.recipes.conftest import TINY_CONFIG, read_disk_log, run_cli, run_in_process, tiny_cfg
from tests.recipes.test_kd_tad import RECORDED_GRAD_NORM, RECORDED_LOSS

pytestmark = pytest.mark.integration_test

PY = sys.executable


def _overrides(assets, out, *extra: str) -> list[str]:
    return [f"assets_dir={assets}", f"output_dir={out}", *extra]


def _check_recorded(out, steps: int) -> list[dict]:
    rows = read_disk_log(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    n = min(steps, len(RECORDED_LOSS))
    assert [r["loss"] for r in rows[:n]] == pytest.approx(RECORDED_LOSS[:n], rel=1e-5)
    assert [r["grad_norm"] for r in rows[:n]] == pytest.approx(RECORDED_GRAD_NORM[:n], rel=1e-5)
    return rows


def test_tune_run_dotted_single_process(tiny_assets, tmp_path):
    """The user's words: ``tune run tad_torchtune.recipes.kd_tad --config configs/tiny_cpu.yaml``."""
    out = tmp_path / "out"
    cmd = ["tune", "run", "tad_torchtune.recipes.kd_tad", "--config", "configs/tiny_cpu.yaml"]
    run_cli(cmd + _overrides(tiny_assets, out, "max_steps_per_epoch=2"))
    _check_recorded(out, 2)
    assert (out / "epoch_0" / "model-00001-of-00001.bin").is_file()


def test_python_m_module(tiny_assets, tmp_path):
    out = tmp_path / "out"
    cmd = [PY, "-m", "tad_torchtune.recipes.kd_tad", "--config", str(TINY_CONFIG)]
    run_cli(cmd + _overrides(tiny_assets, out, "max_steps_per_epoch=2"))
    _check_recorded(out, 2)


def test_two_processes_match_one_and_resume(tiny_assets, tmp_path):
    """``tune run --nproc_per_node 2`` (FSDP2, gloo) equals one process with the same global batch; a
    ``torchrun -m`` run resumed from its step-2 checkpoint continues with the same losses."""
    common = ["batch_size=2", "max_steps_per_epoch=4", "save_every_n_steps=1", "keep_last_n_checkpoints=null"]
    full = tmp_path / "full"
    cmd = ["tune", "run", "--nproc_per_node", "2", "tad_torchtune.recipes.kd_tad", "--config", "configs/tiny_cpu.yaml"]
    proc = run_cli(cmd + _overrides(tiny_assets, full, *common))
    # The default fused_loss: auto takes the fused path (hidden states + output weights) on both ranks and here.
    assert (proc.stdout + proc.stderr).count("loss path: fused") == 1  # logged by rank 0
    two = _check_recorded(full, 4)
    one = run_in_process(tiny_cfg(tiny_assets, tmp_path / "one", max_steps_per_epoch=4, save_every_n_steps=None))
    assert one._fused_loss is not None
    for r, m in zip(two, one.metrics_history, strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "alpha_t_mean", "w_mean", "num_tokens"):
            assert r[key] == pytest.approx(m[key], rel=1e-5, abs=1e-6), key
        assert r["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-5)
    # FLOP metrics are rank 0's own: its 2 sequences' FLOPs per token at their padded length (fused TAD), its
    # tokens/s; the peak was probed on each rank and all-reduced (one log line, by rank 0).
    assert (proc.stdout + proc.stderr).count("matmul probe on cpu") == 1
    cfg = OmegaConf.load(TINY_CONFIG)
    student, teacher = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "teacher_model"))
    kw = dict(loss="tad", fused=True, fused_chunk_size=1024)  # the recipe's slices for a plain TADLoss
    per_length = {estimate_flops_per_token(student, teacher, s, **kw).total for s in range(2, 49)}
    for r in two:
        assert r["flops_per_token"] in per_length
        achieved = r["tflops_per_second_per_gpu"] * 1e12
        assert achieved == pytest.approx(r["tokens_per_second_per_gpu"] * r["flops_per_token"], rel=1e-9)
        assert 0 < r["mfu"] < 1

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m"]
    cmd += ["tad_torchtune.recipes.kd_tad", "--config", str(TINY_CONFIG)]
    run_cli(cmd + _overrides(tiny_assets, resumed, *common, "resume_from_checkpoint=true"))
    after = read_disk_log(resumed)
    assert [r["step"] for r in after] == [3, 4]
    assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in two[2:]], rel=1e-6)
    assert [r["grad_norm"] for r in after] == pytest.approx([r["grad_norm"] for r in two[2:]], rel=1e-6)


def test_tad_tune_ls_cp(tmp_path, capsys, monkeypatch):
    """``tad-tune ls`` / ``cp`` (the console script's own code, in-process) list and copy ours."""
    from tad_torchtune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["ls"]) == 0
    listing = capsys.readouterr().out
    assert any(line.startswith("knowledge_distillation_tad") for line in listing.splitlines())
    assert "tiny_cpu" in listing and "qwen1.5_1.8b_to_1.2b" in listing
    assert "full_finetune_single_device" in listing  # torchtune's own entries are still there
    assert main(["cp", "tiny_cpu", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_text() == TINY_CONFIG.read_text()
    assert main(["cp", "knowledge_distillation_tad", str(tmp_path / "my_recipe.py")]) == 0
    assert "class KDTADRecipe" in (tmp_path / "my_recipe.py").read_text()


def test_tad_tune_run_by_name(tiny_assets, tmp_path):
    """``tad-tune run knowledge_distillation_tad --config tiny_cpu`` (names, not paths; another cwd)."""
    out = tmp_path / "out"
    cmd = ["tad-tune", "run", "knowledge_distillation_tad", "--config", "tiny_cpu"]
    run_cli(cmd + _overrides(tiny_assets, out, "max_steps_per_epoch=1"), cwd=tmp_path)
    _check_recorded(out, 1)
