"""Grid variants that train on a corpus made by an offline teacher step (``data: NAME``): MiniPLM, Seq-KD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tad_torchtune.experiments.grid import GridError, load_grid
from tad_torchtune.experiments.runner import run_grid

pytestmark = pytest.mark.integration_test

GRID = {
    "name": "tiny_offline",
    "setup": {"kind": "tiny", "seq_len": 32, "heldout_sequences": 4},
    "budget": {"steps": 2, "batch_size": 2},
    "eval": {"every_steps": 2, "curve_sequences": 2, "ks": [1]},
    "seeds": [1],
    "data": {
        "mp": {"kind": "miniplm", "windows": 12},
        "sk": {"kind": "seqkd", "windows": 4, "prefix_len": 16, "max_new_tokens": 8, "batch_size": 2},
    },
    "variants": {
        "CE": {"overrides": {"kd_loss": None, "kd_weight": 0.0}},
        "MP_CE": {"data": "mp", "overrides": {"kd_loss": None, "kd_weight": 0.0}},
        "SK_CE": {"data": "sk", "overrides": {"kd_loss": None, "kd_weight": 0.0}},
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _grid(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **changes}))
    return path


def test_offline_corpora_are_built_once_and_the_variants_train_on_them(tmp_path, monkeypatch):
    out = tmp_path / "out"
    results = run_grid(load_grid(_grid(tmp_path)), out, progress=False)
    assert sorted(r["variant"] for r in results) == ["CE", "MP_CE", "SK_CE"]
    assert all(r["steps"] == 2 for r in results)

    # MiniPLM: the runs read the selected file, which holds the top half of the pool by the stored scores.
    from tad_torchtune.data.token_file import open_token_file
    from tad_torchtune.offline import load_pass

    record = json.loads((out / "data" / "mp" / "corpus.json").read_text())
    config = json.loads((out / "runs" / "MP_CE" / "seed_1" / "run.json").read_text())["config"]
    assert config["dataset"] == record["dataset"]
    assert Path(config["dataset"]["path"]) == out / "data" / "mp" / "selected.bin"
    pool, _ = open_token_file(out / "data" / "mp" / "pool.bin")
    selected, _ = open_token_file(out / "data" / "mp" / "selected.bin")
    scores = load_pass(out / "data" / "mp" / "scores")["score"]
    assert len(scores) == 12 and record["cost"]["windows_kept"] == 6
    kept = sorted(np.argsort(-scores, kind="stable")[:6])
    want = np.concatenate([pool[i * 32 : i * 32 + 32] for i in kept] + [pool[kept[-1] * 32 + 32 : kept[-1] * 32 + 33]])
    np.testing.assert_array_equal(selected, want)
    assert record["cost"]["teacher_forward_tokens"] == 12 * 32

    # Seq-KD: the teacher's continuations of the first 16 tokens of 4 pool windows, at most 8 new tokens each.
    sk = json.loads((out / "data" / "sk" / "corpus.json").read_text())
    config = json.loads((out / "runs" / "SK_CE" / "seed_1" / "run.json").read_text())["config"]
    assert config["dataset"]["_component_"] == "tad_torchtune.offline.seqkd_dataset"
    assert config["dataset"]["max_seq_len"] == 24 and sk["cost"]["prompts"] == 4
    assert 0 < sk["cost"]["generated_tokens"] <= 32
    gen = load_pass(out / "data" / "sk" / "seqkd")
    sk_pool, _ = open_token_file(out / "data" / "sk" / "pool.bin")
    np.testing.assert_array_equal(gen["prompt_tokens"][:16], sk_pool[:16])  # window 0's prefix

    # A second invocation (one more seed) reuses both corpora: no teacher pass, the files untouched.
    import tad_torchtune.offline.engine as engine

    stamps = {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*") if p.is_file()}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a corpus was built again")

    monkeypatch.setattr(engine, "run_pass", must_not_run)
    results = run_grid(load_grid(_grid(tmp_path, seeds=[1, 2])), out, progress=False)
    assert sorted((r["variant"], r["seed"]) for r in results) == [
        (v, s) for v in ("CE", "MP_CE", "SK_CE") for s in (1, 2)
    ]
    assert {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*") if p.is_file()} == stamps

    # Changing a corpus's settings in the same folder is refused before anything is trained.
    changed = {**GRID["data"], "mp": {"kind": "miniplm", "windows": 10}}
    with pytest.raises(GridError, match="built with other settings|run with other settings"):
        run_grid(load_grid(_grid(tmp_path, data=changed)), out, progress=False)


@pytest.mark.parametrize(
    "data, variant_data, words",
    [
        ({"mp": {"kind": "minplm"}}, "mp", "data.mp.kind: must be one of miniplm, seqkd"),
        ({"mp": {"kind": "miniplm", "ratio": 0.5}}, "mp", "data.mp: unknown key 'ratio'"),
        ({"mp": {"kind": "miniplm", "fraction": 1.5}}, "mp", "data.mp.fraction: must be a number in (0, 1]"),
        ({"mp": {"kind": "miniplm", "reference_layers": "0-3;26"}}, "mp", "data.mp.reference_layers"),
        ({"sk": {"kind": "seqkd", "prefix_len": 30, "max_new_tokens": 8}}, "sk", "> setup.seq_len (32)"),
        ({"sk": {"kind": "seqkd", "max_new_tokens": 8}}, "sk", "data.sk.prefix_len: must be an integer"),
        ({"mp": {"kind": "miniplm"}}, "mq", "variants.V.data: unknown corpus 'mq'; the grid's corpora: mp"),
    ],
)
def test_a_malformed_data_key_is_refused_before_any_run(tmp_path, capsys, data, variant_data, words):
    from tad_torchtune.experiments.cli import main

    path = _grid(tmp_path, data=data, variants={"V": {"data": variant_data}})
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
