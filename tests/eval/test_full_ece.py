"""Full-ECE: a hand-computed example, a brute-force O(N*V) loop, streaming invariance, calibration sanity."""

from __future__ import annotations

import pytest
import torch

from tad_torchtune.eval.full_ece import FullECE, full_ece_of_model
from tests.eval._tiny import random_batches, tiny_llama


def _bruteforce(probs, labels, m):
    hits, mass, n = [0.0] * m, [0.0] * m, 0
    for i in range(len(labels)):
        if labels[i] == -100:
            continue
        n += 1
        for k in range(len(probs[i])):
            b = min(int(probs[i][k] * m), m - 1)
            mass[b] += probs[i][k]
            hits[b] += 1.0 if k == labels[i] else 0.0
    return sum(abs(h - c) for h, c in zip(hits, mass, strict=True)) / n


def test_hand_computed_example():
    # Two positions, 3 classes, M=2 bins ([0,.5), [.5,1]).
    # row 0: p=(.7,.2,.1), label 0 -> bin1 mass .7, bin0 mass .3, hit in bin1
    # row 1: p=(.6,.3,.1), label 1 -> bin1 mass .6, bin0 mass .4, hit in bin0
    # A=(1,1), C=(0.7, 1.3) -> (|1-.7| + |1-1.3|)/2 = 0.3
    metric = FullECE(n_bins=2)
    metric.update_probs(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]), torch.tensor([0, 1]))
    res = metric.compute()
    assert res["full_ece"] == pytest.approx(0.3)
    assert res["bins_hits"] == [1.0, 1.0] and res["bins_mass"] == pytest.approx([0.7, 1.3])
    # top-1 ECE: both in bin 1, conf .7+.6, correct 1 -> |1 - 1.3| / 2
    assert res["ece_top1"] == pytest.approx(0.15)


@pytest.mark.parametrize("m", [1, 3, 10, 15])
def test_matches_bruteforce_and_streams(m):
    logits = torch.randn(3, 7, 11) * 3
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    whole = FullECE(m)
    whole.update(logits, labels)
    streamed = FullECE(m)
    for i in range(3):  # the accumulators are additive: order and split do not matter
        streamed.update(logits[i], labels[i], max_rows=2)
    p = logits.softmax(-1).reshape(-1, 11).tolist()
    ref = _bruteforce(p, labels.reshape(-1).tolist(), m)
    assert whole.compute()["full_ece"] == pytest.approx(ref, abs=1e-10)
    assert streamed.compute()["full_ece"] == pytest.approx(ref, abs=1e-10)
    res = whole.compute()
    assert sum(res["bins_hits"]) == res["num_tokens"] == 18
    assert sum(res["bins_mass"]) == pytest.approx(18, abs=1e-5)


def test_calibrated_vs_overconfident():
    torch.manual_seed(0)
    logits = torch.randn(4000, 20) * 2.5
    labels = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)  # labels drawn from p: calibrated
    calibrated, sharp = FullECE(10), FullECE(10)
    calibrated.update(logits, labels)
    sharp.update(logits * 3.0, labels)  # temperature 1/3: over-confident
    assert calibrated.compute()["full_ece"] < 0.05 < sharp.compute()["full_ece"]


def test_model_helper_and_errors():
    model = tiny_llama(vocab_size=30)
    model.set_num_output_chunks(2)
    batches = random_batches(30)
    res = full_ece_of_model(model, batches, n_bins=5)
    model.set_num_output_chunks(0)
    direct = FullECE(5)
    with torch.no_grad():
        for b in batches:
            direct.update(model(b["tokens"]), b["labels"])
    assert res["full_ece"] == pytest.approx(direct.compute()["full_ece"], abs=1e-9)
    assert res["num_tokens"] == sum(int((b["labels"] != -100).sum()) for b in batches)
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        FullECE(0)
