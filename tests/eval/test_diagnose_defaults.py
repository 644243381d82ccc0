"""``tad-tune diagnose``: the row length comes from the model unless told; too long a one is refused in one line;
shipped config names work from any folder; the tiny assets carry the held-out text the docs use."""

from __future__ import annotations

import pytest

from tad_torchtune.eval.diagnostics import main
from tad_torchtune.testing.tiny import write_tiny_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("tiny"))


def test_ece_takes_seq_len_from_the_model(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped name `tiny_cpu` resolves from any folder
    argv = ["ece", "--config", "tiny_cpu", "--text", str(assets / "data" / "heldout.txt"), "--max-batches", "2"]
    argv += ["--out", str(tmp_path / "d"), f"assets_dir={assets}", "checkpointer.checkpoint_dir=${assets_dir}/student"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "seq_len 128 (models' max_seq_len {'model': 128}" in out
    # 2 batches x 4 rows x 128 positions
    assert "tokens=1024" in out


def test_too_long_seq_len_is_refused_before_compute(assets, tmp_path, capsys):
    argv = ["tail", "--config", "tiny_cpu", "--text", str(assets / "data" / "heldout.txt"), "--seq-len", "512"]
    assert main(argv + ["--out", str(tmp_path / "d"), f"assets_dir={assets}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "tad-tune diagnose tail: --seq-len 512 exceeds max_seq_len of {'teacher_model': 128} (the RoPE cache); "
        "pass --seq-len 128 or less"
    )
    assert not (tmp_path / "d" / "teacher_tail_mass.csv").exists()


def test_missing_config_is_one_line(tmp_path, capsys):
    assert main(["ece", "--config", str(tmp_path / "nope.yaml"), "--text", "x.txt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tad-tune diagnose ece: config ") and "shipped config name" in err


def test_compare_with_a_missing_csv_is_one_line(tmp_path, capsys):
    assert main(["compare", "--run", f"TAD={tmp_path / 'nope.csv'}", "--out", str(tmp_path / "k.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tad-tune diagnose compare: ") and "nope.csv" in err and len(err.splitlines()) == 1


def test_loading_a_model_leaves_no_scratch_folder(assets, tmp_path, monkeypatch):
    """Every model load made an empty tad_eval_ckpt_* folder in the temp dir for torchtune's checkpointer and
    left it there (one per eval, diagnose and offline pass)."""
    import tempfile

    import torch

    from tad_torchtune.eval.loading import build_model
    from tad_torchtune.testing.tiny import tiny_config

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    cfg = tiny_config(assets, tmp_path / "out")
    cfg.checkpointer.pop("output_dir", None)  # as in the eval configs: the load needs no output folder
    model = build_model(cfg, "model", "checkpointer", torch.device("cpu"), torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert list(scratch_root.iterdir()) == []
