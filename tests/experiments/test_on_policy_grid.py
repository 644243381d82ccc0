"""On-policy distillation as a grid variant: the ``prompts`` corpus (training windows split into a prompt and
the original continuation) and variants with an ``on_policy`` section on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tad_torchtune.experiments.grid import GridError, load_grid, parse_grid
from tad_torchtune.experiments.runner import read_jsonl, run_grid

pytestmark = pytest.mark.integration_test

TAD = {"_component_": "tad_torchtune.TADLoss", "top_k": 4, "beta": 2.0}
GRID = {
    "name": "tiny_on_policy",
    "setup": {"kind": "tiny", "seq_len": 32, "heldout_sequences": 4},
    "budget": {"steps": 2, "batch_size": 2},
    "eval": {"every_steps": 2, "curve_sequences": 2, "ks": [1]},
    "seeds": [1],
    "data": {"pr": {"kind": "prompts", "windows": 6, "prefix_len": 20, "response_len": 8, "sample_seed": 3}},
    "variants": {
        "OFF": {"data": "pr", "overrides": {"kd_loss": TAD}},
        "ON": {
            "data": "pr",
            "overrides": {"kd_loss": TAD, "on_policy": {"fraction": 1.0, "max_new_tokens": 8}},
        },
    },
    "compare": [["ON", "OFF"]],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _grid(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **changes}))
    return path


def test_the_prompts_corpus_is_the_sampled_windows_split_at_prefix_len_with_the_prompt_masked(tmp_path):
    from tad_torchtune.experiments.corpora import build_corpus
    from tad_torchtune.experiments.setups import make_setup
    from tad_torchtune.offline import seqkd_dataset

    spec = parse_grid(GRID)
    setup = make_setup(spec, tmp_path)
    setup.prepare_students()  # the tiny assets hold the training text
    record = build_corpus(setup, "pr")
    node = dict(record["dataset"])
    assert node.pop("_component_") == "tad_torchtune.offline.seqkd_dataset"
    assert node["max_seq_len"] == 28 and node["train_on_prompt"] is False
    ds = seqkd_dataset(setup.training_windows()[1], **node)  # the run's tokenizer is checked against the pass

    # Independently: the tiny training text, byte-tokenised with EOS after each document, packed into windows
    # of 33 ids at stride 32; 6 of them drawn with the corpus's sample seed, in text order.
    from tad_torchtune.data.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    texts = [json.loads(x)["text"] for x in (tmp_path / "assets" / "data" / "train.jsonl").read_text().splitlines()]
    stream = [i for t in texts for i in [*tok.encode(t, add_bos=False, add_eos=False), tok.eos_id]]
    windows = [stream[s : s + 33] for s in range(0, len(stream) - 32, 32)]
    picked = sorted(torch.randperm(len(windows), generator=torch.Generator().manual_seed(3))[:6].tolist())
    assert len(ds) == 6
    for item, w in zip([ds[i] for i in range(6)], picked, strict=True):
        assert item["tokens"] == windows[w][:28]
        assert item["labels"] == [-100] * 20 + windows[w][20:28]
    assert record["cost"]["prompts"] == 6 and record["cost"]["response_tokens"] == 48
    assert record["cost"]["prompt_tokens"] == 120 and "none" in record["cost"]["teacher_passes"]

    # Built once: a second call reads corpus.json back; other settings in the same folder are refused.
    assert build_corpus(setup, "pr") == record
    other = parse_grid({**GRID, "data": {"pr": {**GRID["data"]["pr"], "response_len": 6}}})
    with pytest.raises(GridError, match="built with other settings than data.pr"):
        build_corpus(make_setup(other, tmp_path), "pr")


def test_an_on_policy_variant_runs_in_the_grid_on_the_prompts_corpus(tmp_path):
    out = tmp_path / "out"
    results = run_grid(load_grid(_grid(tmp_path)), out, progress=False)
    assert sorted(r["variant"] for r in results) == ["OFF", "ON"] and all(r["steps"] == 2 for r in results)
    record = json.loads((out / "data" / "pr" / "corpus.json").read_text())
    for variant in ("OFF", "ON"):
        config = json.loads((out / "runs" / variant / "seed_1" / "run.json").read_text())["config"]
        assert config["dataset"] == record["dataset"]
    on = read_jsonl(out / "runs" / "ON" / "seed_1" / "train.jsonl")
    off = read_jsonl(out / "runs" / "OFF" / "seed_1" / "train.jsonl")
    assert [r["on_policy_fraction"] for r in on] == [1.0, 1.0]
    assert all(0 < r["on_policy_gen_len_mean"] <= 8 for r in on)
    assert not any("on_policy_fraction" in r for r in off)  # λ = 0: the off-policy recipe, no generation
    # Off-policy, each step trains on the 2 rows' 8 reference tokens; on-policy on the sampled ones.
    assert [r["num_tokens"] for r in off] == [16.0, 16.0]
    assert [r["num_tokens"] for r in on] == [2 * r["on_policy_gen_len_mean"] for r in on]

    # The report pairs them; two TAD variants with the same K and beta are no K or beta sweep.
    from tad_torchtune.experiments.report import write_report

    md = write_report(out).read_text()
    assert "| ON − OFF | heldout | fkl |" in md
    assert "Table 1" not in md and "Table 2" not in md and not (out / "report" / "sweep_k.png").exists()


@pytest.mark.parametrize(
    "corpus, words",
    [
        ({"kind": "prompts", "prefix_len": 20}, "data.pr.response_len: must be an integer >= 1, got None"),
        ({"kind": "prompts", "prefix_len": 20, "response_len": 0}, "data.pr.response_len: must be an integer >= 1"),
        ({"kind": "prompts", "prefix_len": "20", "response_len": 8}, "data.pr.prefix_len: must be an integer >= 1"),
        (
            {"kind": "prompts", "prefix_len": 20, "response_len": 8, "max_new_tokens": 8},
            "data.pr: unknown key 'max_new_tokens'; allowed: kind, prefix_len, response_len, sample_seed, windows",
        ),
        ({"kind": "prompts", "prefix_len": 20, "response_len": 8, "dtype": "bf16"}, "unknown key 'dtype'"),
        (
            {"kind": "prompts", "prefix_len": 24, "response_len": 9},
            "data.pr: prefix_len + response_len = 33 > setup.seq_len (32)",
        ),
        ({"kind": "prompt", "prefix_len": 20, "response_len": 8}, "must be one of miniplm, seqkd, prompts"),
        ({"kind": "prompts", "prefix_len": 20, "response_len": 8, "windows": -1}, "data.pr.windows: must be"),
    ],
)
def test_a_malformed_prompts_key_is_refused_before_any_run(tmp_path, capsys, corpus, words):
    from tad_torchtune.experiments.cli import main

    path = _grid(tmp_path, data={"pr": corpus})
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_shipped_on_policy_grid_parses_with_every_variant_on_the_prompts_corpus():
    spec = load_grid("on_policy_cpu")
    assert spec.data == {
        "prompts": {"kind": "prompts", "sample_seed": 0, "windows": 48, "prefix_len": 96, "response_len": 32}
    }
    assert {v.name: v.data for v in spec.variants} == dict.fromkeys(
        ("TAD_offpolicy", "TAD_onpolicy", "RKL_onpolicy"), "prompts"
    )
    on = {v.name: v.overrides.get("on_policy", {}).get("fraction", 0.0) for v in spec.variants}
    assert on == {"TAD_offpolicy": 0.0, "TAD_onpolicy": 1.0, "RKL_onpolicy": 1.0}
    assert (spec.steps, spec.batch_size, spec.setup["seq_len"]) == (24, 2, 128)
