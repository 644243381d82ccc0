"""``tad-tune offline``: score -> select -> the recipe trains on the selection; generate -> the recipe trains on
the continuations; refusals before compute; two torchrun processes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from tad_torchtune.cli import main
from tad_torchtune.offline import load_pass, read_manifest
from tad_torchtune.training.tiny import TINY_CONFIG_PATH, tiny_config
from tests.offline.conftest import L

REF = ["--reference-key", "model", "--reference-checkpointer-key", "checkpointer"]


def _base(tiny, out):
    return [
        "--config",
        str(TINY_CONFIG_PATH),
        f"assets_dir={tiny}",
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--no-progress",
        "--shard-size",
        "8",
        "--batch-size",
        "4",
    ]


def _train(cfg_overrides, tiny, out):
    from tad_torchtune.recipes.kd_tad import run

    cfg = tiny_config(tiny, out)
    for key, value in cfg_overrides.items():
        cfg[key] = value  # replaced, not merged
    cfg.max_steps_per_epoch = 2
    cfg.save_every_n_steps = 2
    run(cfg)
    return sorted(p.name for p in (out / "logs").glob("*"))


def test_score_select_and_train_on_the_selection(tiny, tmp_path, capsys):
    data = tiny / "data" / "train.bin"
    args = ["offline", "score", *_base(tiny, tmp_path / "s"), "--data", str(data), "--max-seq-len", str(L), *REF]
    assert main(args + ["--max-windows", "20"]) == 0
    assert read_manifest(tmp_path / "s")["complete"] and len(load_pass(tmp_path / "s")["score"]) == 20
    sel = tmp_path / "sel.bin"
    assert main(["offline", "select", "--scores", str(tmp_path / "s"), "--output", str(sel)]) == 0
    assert "kept 10 of 20 windows" in capsys.readouterr().out
    ds = {
        "dataset": OmegaConf.create(
            {"_component_": "tad_torchtune.data.packed_token_dataset", "path": str(sel), "max_seq_len": L}
        )
    }
    assert _train(ds, tiny, tmp_path / "run")  # the recipe reads the selection unchanged (CE + TAD)
    # a rerun of the same command finds every shard complete; another window count is refused
    assert main(args + ["--max-windows", "20"]) == 0
    assert main(args + ["--max-windows", "21"]) == 1
    assert "made with other inputs or settings (num_instances: 20 -> 21" in capsys.readouterr().err


def test_generate_from_window_prefixes_and_train_with_ce_only(tiny, tmp_path):
    data = tiny / "data" / "train.bin"
    out = tmp_path / "g"
    args = [
        "offline",
        "generate",
        *_base(tiny, out),
        "--data",
        str(data),
        "--max-seq-len",
        str(L),
        "--prefix-len",
        "6",
        "--max-windows",
        "10",
        "--max-new-tokens",
        "12",
    ]
    assert main(args) == 0
    gen = load_pass(out)
    assert gen["prompt_lengths"].tolist() == [6] * 10 and gen["lengths"].max() <= 12
    ds = {
        "dataset": OmegaConf.create(
            {"_component_": "tad_torchtune.offline.seqkd_dataset", "path": str(out), "max_seq_len": 32}
        ),
        "kd_weight": 0.0,
        "batch_size": 2,
    }
    assert _train(ds, tiny, tmp_path / "run")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prefix-len", "0"], "--prefix-len must be >= 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--orca", "x.json"], "either as --data"),
        ([], "--data needs --prefix-len"),
    ],
)
def test_generate_refuses_bad_arguments_in_one_line(tiny, tmp_path, capsys, extra, message):
    args = [
        "offline",
        "generate",
        *_base(tiny, tmp_path),
        "--data",
        str(tiny / "data" / "train.bin"),
        "--max-seq-len",
        str(L),
        "--max-new-tokens",
        "4",
        *extra,
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_corpus_of_another_tokenizer_is_refused_before_compute(tiny, tmp_path, capsys):
    from tad_torchtune.data import write_token_file
    from tests.data.byte_tokenizer import ByteTokenizer

    other = tmp_path / "other.bin"
    tok = ByteTokenizer()
    tok.encode = lambda text, add_bos=True, add_eos=True: [ord(c) % 7 for c in text]  # splits differently
    write_token_file(other, tok, tiny / "data" / "train.jsonl", num_workers=0, progress=False)
    args = ["offline", "score", *_base(tiny, tmp_path / "s"), "--data", str(other), "--max-seq-len", str(L), *REF]
    assert main(args) == 1
    assert "splits text differently" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.integration_test
def test_two_torchrun_processes_write_the_same_shards_as_one(tiny, tmp_path):
    data = tiny / "data" / "train.bin"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [*REF, "--data", str(data), "--max-seq-len", str(L), "--max-windows", "30"]
    one = [sys.executable, "-m", "tad_torchtune.cli", "offline", "score", *_base(tiny, tmp_path / "one"), *common]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "tad_torchtune.cli",
        "offline",
        "score",
        *_base(tiny, tmp_path / "two"),
        *common,
    ]
    for cmd in (one, two):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "one").glob("shard_*"))}
    assert len(files) == 4
    assert files == {p.name: p.read_bytes() for p in sorted((tmp_path / "two").glob("shard_*"))}
    assert read_manifest(tmp_path / "two")["complete"]
    np.testing.assert_array_equal(load_pass(tmp_path / "two")["index"], np.arange(30))
