"""The experiment runner on a tiny grid of tiny models: metrics, skipping, exact resume, statistics, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tad_torchtune.experiments.grid import GridError, load_grid, parse_grid
from tad_torchtune.experiments.runner import RunRecorder, read_jsonl, run_grid
from tad_torchtune.experiments.stats import paired_difference, summarize

pytestmark = pytest.mark.integration_test

TINY_GRID = {
    "name": "tiny_grid",
    "setup": {"kind": "tiny", "seq_len": 32, "heldout_sequences": 6, "ood_sequences": 2},
    "budget": {"steps": 4, "batch_size": 2},
    "eval": {"every_steps": 2, "curve_sequences": 3, "ks": [1, 5]},
    "seeds": [1, 2],
    "variants": {
        "CE": {"overrides": {"kd_loss": None, "kd_weight": 0.0}},
        "TAD": {"overrides": {"kd_loss": {"_component_": "tad_torchtune.TADLoss", "top_k": 5, "beta": 2.0}}},
    },
    "compare": [["TAD", "CE"]],
}
# Timing and memory differ between processes and runs; everything else must be identical.
_TIMING = {"tokens_per_second_per_gpu", "peak_rss_gib", "tflops_per_second_per_gpu", "mfu"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


def _grid(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY_GRID, **changes}))
    return path


def _records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    train = [{k: v for k, v in r.items() if k not in _TIMING} for r in read_jsonl(run_dir / "train.jsonl")]
    return train, read_jsonl(run_dir / "evals.jsonl")


def test_every_run_measures_and_a_second_invocation_skips_them(tmp_path, monkeypatch):
    spec = load_grid(_grid(tmp_path))
    results = run_grid(spec, tmp_path / "out", progress=False)
    assert sorted((r["variant"], r["seed"]) for r in results) == [("CE", 1), ("CE", 2), ("TAD", 1), ("TAD", 2)]
    for r in results:
        assert r["steps"] == 4 and r["train_tokens"] > 0
        assert set(r["final"]) == {"heldout", "docstrings"}
        final = r["final"]["heldout"]
        assert final["num_tokens"] == 6 * 32
        for key in ("fkl", "rkl", "ce", "ppl", "top1_agreement", "full_ece", "alpha_t_1", "alpha_s_5"):
            assert math.isfinite(final[key]), key
        assert final["fkl"] > 0 and final["rkl"] > 0
        assert 0 < final["alpha_t_5"] < final["alpha_t_1"] < 1  # a larger top-K leaves less tail
        assert [c["step"] for c in r["curve"]] == [0, 2, 4]
    # The seed orders the data: two seeds of a variant differ, the variants of a seed share their step-0 point.
    by = {(r["variant"], r["seed"]): r for r in results}
    assert by["TAD", 1]["final"]["heldout"]["fkl"] != by["TAD", 2]["final"]["heldout"]["fkl"]
    assert by["TAD", 1]["curve"][0] == by["CE", 1]["curve"][0]
    # KD-style training moves the student toward the teacher more than CE alone on this sharpened teacher.
    assert by["TAD", 1]["final"]["heldout"]["fkl"] < by["TAD", 1]["curve"][0]["fkl"]

    import tad_torchtune.recipes.kd_tad as kd_tad

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(kd_tad, "run", must_not_run)
    again = run_grid(spec, tmp_path / "out", progress=False)
    assert [r["fingerprint"] for r in again] == [r["fingerprint"] for r in results]


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    spec = load_grid(_grid(tmp_path, seeds=[1], variants={"TAD": TINY_GRID["variants"]["TAD"]}, compare=[]))
    run_grid(spec, tmp_path / "whole", progress=False)

    original = RunRecorder.on_step_end

    def crash_at_step_3(self, recipe, step, metrics):
        original(self, recipe, step, metrics)
        if step == 3:  # after step 3's records are written, before any checkpoint of step 3 or 4
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(RunRecorder, "on_step_end", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, tmp_path / "cut", progress=False)
    run_dir = tmp_path / "cut" / "runs" / "TAD" / "seed_1"
    assert not (run_dir / "result.json").exists()
    assert [r["step"] for r in read_jsonl(run_dir / "train.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(RunRecorder, "on_step_end", original)
    (resumed,) = run_grid(spec, tmp_path / "cut", progress=False)
    # Resumed from the step-2 checkpoint; step 3's first records were dropped and made again, identically.
    assert _records(run_dir) == _records(tmp_path / "whole" / "runs" / "TAD" / "seed_1")
    whole = json.loads((tmp_path / "whole" / "runs" / "TAD" / "seed_1" / "result.json").read_text())
    assert resumed["final"] == whole["final"] and resumed["curve"] == whole["curve"]


def test_paired_interval_equals_a_hand_computed_example():
    # Differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653, half-width 4.302653 * 0.1 / sqrt(3).
    a, b = {1: 1.1, 2: 2.3, 3: 0.7, 9: 5.0}, {1: 1.0, 2: 2.0, 3: 0.5, 4: 7.0}
    d = paired_difference(a, b)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert d.seeds == (1, 2, 3) and d.n == 3
    assert d.mean == pytest.approx(0.2) and d.sd == pytest.approx(0.1)
    assert (d.low, d.high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert not d.established  # [-0.048, 0.448] covers 0
    # Differences 0.10, 0.12, 0.11: mean 0.11, sd 0.01, interval 0.11 +- 0.0248: excludes 0.
    d = paired_difference({1: 0.10, 2: 0.12, 3: 0.11}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert d.low == pytest.approx(0.11 - 4.302652729911275 * 0.01 / math.sqrt(3)) and d.established
    s = summarize([1.0, 2.0, 4.0])
    expected_sd = math.sqrt(((4 / 3) ** 2 + (1 / 3) ** 2 + (5 / 3) ** 2) / 2)
    assert (s.mean, s.sd, s.n) == (pytest.approx(7 / 3), pytest.approx(expected_sd), 3)


def test_an_interval_that_covers_zero_is_not_established():
    d = paired_difference({1: 0.1, 2: -0.1, 3: 0.05}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert d.low < 0 < d.high and not d.established
    assert not paired_difference({1: 1.0}, {1: 0.0}).established  # one seed: no interval


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"budget": {"steps": 4, "batch_size": 2, "step": 3}}, ["budget", "unknown key 'step'"]),
        ({"seeds": [1, 1]}, ["seeds", "repeat"]),
        ({"setup": {"kind": "gpt5", "seq_len": 32, "heldout_sequences": 6}}, ["setup.kind", "gpt5"]),
        ({"variants": {"KD": {"overides": {}}}}, ["variants.KD", "unknown key 'overides'"]),
        ({"variants": {"KD": {"overrides": {"seed": 3}}}}, ["variants.KD.overrides", "set by the runner"]),
        ({"variants": {"KD": {"student": "s99"}}}, ["variants.KD.student", "s99"]),
        ({"compare": [["TAD", "KD"]]}, ["compare", "KD"]),
        ({"eval": {"curve_sequences": 60}}, ["eval.curve_sequences", "60"]),
        ({"budget": {"steps": 0, "batch_size": 2}}, ["budget.steps", "integer >= 1", "0"]),
    ],
)
def test_a_malformed_grid_is_one_clear_error_before_any_run(tmp_path, change, words, capsys):
    from tad_torchtune.experiments.cli import main

    path = _grid(tmp_path, **change)
    with pytest.raises(GridError) as info:
        parse_grid(yaml.safe_load(path.read_text()))
    for w in words:
        assert w in str(info.value)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words[0] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_changed_variant_is_refused_in_the_old_folder(tmp_path):
    spec = load_grid(_grid(tmp_path, seeds=[1], budget={"steps": 2, "batch_size": 2}, eval={"every_steps": 2}))
    run_grid(spec, tmp_path / "out", progress=False, only={"CE"})
    changed = dict(TINY_GRID["variants"], CE={"overrides": {"kd_loss": None, "kd_weight": 0.0, "optimizer.lr": 0.1}})
    spec2 = load_grid(_grid(tmp_path, seeds=[1], budget={"steps": 2, "batch_size": 2}, eval={"every_steps": 2},
                            variants=changed))  # fmt: skip
    with pytest.raises(GridError, match="other settings"):
        run_grid(spec2, tmp_path / "out", progress=False, only={"CE"})


def test_the_report_writes_tables_and_figures(tmp_path):
    from tad_torchtune.experiments.report import write_report

    spec = load_grid(_grid(tmp_path))
    run_grid(spec, tmp_path / "out", progress=False)
    md = write_report(tmp_path / "out").read_text()
    out = tmp_path / "out" / "report"
    for name in ("runs.csv", "summary.csv", "paired.csv", "curves.csv", "teacher_tail.csv",
                 "fig1_heldout_kl_default.png", "fig2_teacher_tail.png", "eq6_alpha.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert "| TAD − CE | heldout | fkl |" in md and "Finished runs: 4 of 4" in md
    assert "| TAD − CE | 2 | " in md and "| TAD − CE | 4 | " in md  # paired along training, per curve step


def test_shipped_grids_parse():
    from tad_torchtune.experiments.grid import shipped_grids

    grids = shipped_grids()
    assert {"tad_vs_kd_cpu", "tad_vs_kd_gpu"} <= set(grids)
    cpu = load_grid("tad_vs_kd_cpu")
    seeds = {v.name: len(v.seeds) for v in cpu.variants}
    assert seeds["CE"] == seeds["KD"] == seeds["TAD_K10"] == 5 and min(seeds.values()) >= 3
    assert cpu.setup["heldout_sequences"] * cpu.setup["seq_len"] >= 16384
