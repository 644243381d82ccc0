"""Held-out KL, teacher tail mass and their CSV/plots against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from tad_torchtune.eval.diagnostics import (
    HeldoutKLTracker,
    heldout_metrics,
    main,
    plot_heldout_kl,
    plot_tail_mass,
    read_heldout_csv,
    teacher_tail_stats,
    write_tail_csv,
)
from tests.eval._tiny import random_batches, tiny_llama


def _reference(student, teacher, batches):
    kl = s_nll = t_nll = agree = n = 0.0
    with torch.no_grad():
        for b in batches:
            s = student(b["tokens"]).double()
            t = teacher(b["tokens"]).double()[..., : s.size(-1)]
            for i in range(s.size(0)):
                for j in range(s.size(1)):
                    y = int(b["labels"][i, j])
                    if y == -100:
                        continue
                    ls, lt = s[i, j].log_softmax(-1), t[i, j].log_softmax(-1)
                    kl += float((lt.exp() * (lt - ls)).sum())
                    s_nll -= float(ls[y])
                    t_nll -= float(lt[y])
                    agree += float(ls.argmax() == lt.argmax())
                    n += 1
    return {"kl": kl / n, "ppl": math.exp(s_nll / n), "teacher_ppl": math.exp(t_nll / n), "top1_agreement": agree / n}


@pytest.mark.parametrize("chunks", [(0, 0), (3, 0), (2, 4)])
def test_heldout_metrics_matches_bruteforce(chunks):
    student = tiny_llama(vocab_size=40, seed=1)
    teacher = tiny_llama(vocab_size=48, num_layers=2, seed=2)  # larger vocab: cut to the student's 40
    batches = random_batches(40)
    ref = _reference(student, teacher, batches)
    if chunks[0]:
        student.set_num_output_chunks(chunks[0])
    if chunks[1]:
        teacher.set_num_output_chunks(chunks[1])
    got = heldout_metrics(student, teacher, batches, max_rows=5)
    n = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert got["num_tokens"] == n
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert got["kl"] > 0.01


def test_heldout_metrics_identity_and_edge_cases():
    model = tiny_llama(vocab_size=32)
    batches = random_batches(32)
    got = heldout_metrics(model, model, batches)
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["top1_agreement"] == 1.0 and got["ppl"] == pytest.approx(got["teacher_ppl"])
    first = int((batches[0]["labels"] != -100).sum())
    assert heldout_metrics(model, model, batches, max_batches=1)["num_tokens"] == first
    empty = [{"tokens": batches[0]["tokens"], "labels": torch.full_like(batches[0]["labels"], -100)}]
    assert math.isnan(heldout_metrics(model, model, empty)["kl"])
    small_teacher = tiny_llama(vocab_size=16)
    with pytest.raises(ValueError, match="teacher vocabulary \\(16\\) is smaller"):
        heldout_metrics(model, small_teacher, random_batches(16))


def test_teacher_tail_stats_matches_sorting():
    teacher = tiny_llama(vocab_size=60, seed=3)
    teacher.set_num_output_chunks(4)
    batches = random_batches(60, ignore_frac=0.3)
    stats = teacher_tail_stats(teacher, batches, ks=[1, 2, 5, 10, 50], vocab_size=56, max_rows=7)
    teacher.set_num_output_chunks(0)
    alpha, hit, wrong, n = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64), 0, 0
    with torch.no_grad():
        for b in batches:
            logits = teacher(b["tokens"]).double()[..., :56]
            keep = b["labels"] != -100
            p = logits[keep].softmax(-1)
            srt, idx = p.sort(-1, descending=True)
            y = b["labels"][keep]
            alpha += (1 - srt[:, :50].cumsum(-1)).sum(0)
            hit += (idx[:, :50] == y[:, None]).double().cumsum(-1).sum(0)
            wrong += int((idx[:, 0] != y).sum())
            n += int(y.numel())
    assert stats["num_tokens"] == n and stats["k"] == [1, 2, 5, 10, 50]
    for j, k in enumerate(stats["k"]):
        assert stats["alpha_k"][j] == pytest.approx(float(alpha[k - 1] / n), abs=1e-6)
        assert stats["label_in_topk"][j] == pytest.approx(float(hit[k - 1] / n), abs=1e-12)
    assert stats["argmax_error_rate"] == pytest.approx(wrong / n)
    assert all(a >= b for a, b in zip(stats["alpha_k"][:-1], stats["alpha_k"][1:], strict=True))
    with pytest.raises(ValueError, match="ks must be positive"):
        teacher_tail_stats(teacher, batches, ks=[0, 3])


def test_tracker_csv_and_plots(tmp_path):
    student, teacher = tiny_llama(vocab_size=32, seed=1), tiny_llama(vocab_size=32, seed=2)
    batches = random_batches(32, n=1)
    tracker = HeldoutKLTracker(batches, every_n_steps=5, csv_path=tmp_path / "kl.csv")
    assert tracker.maybe_run(3, student, teacher) is None
    rows = [tracker.maybe_run(s, student, teacher) for s in (0, 5, 10)]
    assert read_heldout_csv(tmp_path / "kl.csv") == [(r["step"], pytest.approx(r["kl"])) for r in rows]
    png = plot_heldout_kl({"TAD": [(0, 1.0), (5, 0.5)], "KD": [(0, 1.0), (5, 0.7)]}, tmp_path / "cmp.png")
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    stats = teacher_tail_stats(teacher, batches, ks=range(1, 11))
    write_tail_csv(stats, tmp_path / "tail.csv")
    lines = (tmp_path / "tail.csv").read_text().splitlines()
    assert len(lines) == 11 and lines[0].startswith("k,alpha_k")
    assert plot_tail_mass({"a": stats, "b": stats}, tmp_path / "tail.png").stat().st_size > 5000
    # the CLI's compare command reads the tracker CSVs
    assert main(["compare", "--run", f"tad={tmp_path / 'kl.csv'}", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()
