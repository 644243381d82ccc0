"""MiniPLM difference sampling: scores against a plain per-position loop, the kept fraction, the new token file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tad_torchtune.data import PackedTokenDataset, read_meta
from tad_torchtune.offline import WindowSource, load_pass, run_pass
from tad_torchtune.offline.miniplm import DifferenceScoreWriter, select_top_fraction, write_selected_token_file
from tests.offline.conftest import L

N = 30


def _plain_score(teacher, ref, window: np.ndarray) -> float:
    """mean_t [log p_T(x_t+1 | x_<=t) - log p_ref(...)], one position at a time, each prefix run separately."""
    total = 0.0
    for t in range(L):
        prefix = torch.as_tensor(window[: t + 1], dtype=torch.long)[None]
        lt = torch.log_softmax(teacher(prefix)[0, -1].double(), -1)
        lr = torch.log_softmax(ref(prefix)[0, -1].double(), -1)
        total += float(lt[window[t + 1]] - lr[window[t + 1]])
    return total / L


@pytest.fixture(scope="module")
def scored(tiny, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores")
    src = WindowSource(tiny / "data" / "train.bin", max_seq_len=L, max_windows=N)
    run_pass(src, DifferenceScoreWriter(*models), out, shard_size=8, batch_size=4, progress=False)
    return out, src


def test_scores_equal_a_plain_loop(models, scored):
    out, src = scored
    teacher, ref = models
    data = load_pass(out)
    expected = np.array([_plain_score(teacher.model, ref.model, src.get(i)) for i in range(N)])
    np.testing.assert_allclose(data["score"], expected, rtol=0, atol=2e-5)
    # the stored sums are the two models' log-likelihoods of the window
    np.testing.assert_allclose((data["teacher_logprob"] - data["ref_logprob"]) / L, data["score"], atol=1e-12)


def test_selection_keeps_exactly_the_top_half_by_the_independent_score(tiny, models, scored, tmp_path):
    out, src = scored
    teacher, ref = models
    expected = np.array([_plain_score(teacher.model, ref.model, src.get(i)) for i in range(N)])
    order = np.argsort(-expected)
    k = N // 2
    assert expected[order[k - 1]] - expected[order[k]] > 1e-4  # the top half is well defined at this tolerance
    kept = select_top_fraction(load_pass(out)["score"], 0.5)
    assert len(kept) == k and set(kept.tolist()) == set(order[:k].tolist())
    assert list(kept) == sorted(kept)

    meta = write_selected_token_file(out, tmp_path / "sel.bin", fraction=0.5)
    assert read_meta(tmp_path / "sel.bin")["num_tokens"] == meta["num_tokens"] == k * L + 1
    ds = PackedTokenDataset(tmp_path / "sel.bin", max_seq_len=L)
    assert len(ds) == k
    for j, i in enumerate(kept):
        w = src.get(int(i))
        got = ds.window(j)
        np.testing.assert_array_equal(got[:L], w[:L])  # every input of the kept window
        nxt = src.get(int(kept[j + 1]))[0] if j + 1 < k else w[L]
        assert got[L] == nxt  # the last label: the next kept window's first token (the file's last: its own)


def test_fraction_and_refusals(scored, tmp_path):
    out, _ = scored
    assert len(select_top_fraction(np.arange(10.0), 0.3)) == 3
    np.testing.assert_array_equal(select_top_fraction(np.array([1.0, 2.0, 2.0, 0.0]), 0.5), [1, 2])
    with pytest.raises(ValueError, match="fraction"):
        select_top_fraction(np.arange(3.0), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        select_top_fraction(np.array([1.0, np.nan]), 0.5)
    write_selected_token_file(out, tmp_path / "a.bin")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_selected_token_file(out, tmp_path / "a.bin")


def test_qwen2_reference_builder_reads_the_hf_config(tmp_path):
    import json

    from torchtune.models.qwen2._component_builders import qwen2

    from tad_torchtune.offline.models import qwen2_from_hf_config

    hf = {
        "model_type": "qwen2",
        "vocab_size": 300,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    got = qwen2_from_hf_config(tmp_path, max_seq_len=64)
    want = qwen2(
        vocab_size=300,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        intermediate_dim=48,
        max_seq_len=64,
        norm_eps=1e-6,
        rope_base=10000.0,
        tie_word_embeddings=True,
    )
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    assert got.layers[0].sa_norm.eps == 1e-6
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2 configs"):
        qwen2_from_hf_config(tmp_path)


def test_selection_refuses_a_corpus_changed_since_scoring(tiny, models, tmp_path):
    import shutil

    for ext in (".bin", ".json"):
        shutil.copy(tiny / "data" / f"train{ext}", tmp_path / f"c{ext}")
    run_pass(
        WindowSource(tmp_path / "c.bin", max_seq_len=L, max_windows=6),
        DifferenceScoreWriter(*models),
        tmp_path / "s",
        progress=False,
    )
    data = bytearray((tmp_path / "c.bin").read_bytes())
    data[10] ^= 1  # same size, other content
    (tmp_path / "c.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="changed since it was scored"):
        write_selected_token_file(tmp_path / "s", tmp_path / "sel.bin")
    assert not (tmp_path / "sel.bin").exists()
