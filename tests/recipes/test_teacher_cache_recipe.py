"""The recipe trained from a teacher cache: equal to the live teacher when the cache is exact, exact resume,
refusals before compute; the CLI writer resumes an interrupted write byte for byte."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tad_torchtune.offline import teacher_cache as tc
from tad_torchtune.offline.teacher_cache_cli import main as cache_main
from tad_torchtune.training.tiny import TINY_CONFIG_PATH
from tad_torchtune.validate import validate_config
from tests.recipes.conftest import run_in_process, tiny_cfg

pytestmark = pytest.mark.integration_test

V_STUDENT = 259  # configs/tiny_cpu.yaml: student vocabulary (the teacher's 264 are cut to it)


def _losses(recipe, key="loss"):
    return [m[key] for m in recipe.metrics_history]


@pytest.fixture(scope="module")
def caches(tiny_assets, tmp_path_factory):
    """Two caches of the tiny config's corpus: all exact (K_max = V) and sparse (K_max = 16, M = 4)."""
    root = tmp_path_factory.mktemp("caches")
    args = ["--config", str(TINY_CONFIG_PATH), "--no-progress", f"assets_dir={tiny_assets}"]
    assert cache_main([*args, "--out", str(root / "exact"), "--k-max", "100000"]) == 0
    assert cache_main([*args, "--out", str(root / "sparse"), "--k-max", "16", "--samples", "4"]) == 0
    return root


def test_exact_cache_run_equals_live_teacher_run(tiny_assets, tmp_path, caches):
    """K_max = V: every teacher probability is cached, so CE, TAD and the training trajectory equal the live
    teacher's (same chunked-logits path; float rounding only)."""
    common = dict(max_steps_per_epoch=4, fused_loss=False)
    live = run_in_process(tiny_cfg(tiny_assets, tmp_path / "live", **common))
    cached = run_in_process(tiny_cfg(tiny_assets, tmp_path / "cache", teacher_cache=str(caches / "exact"), **common))
    assert cached._teacher_model is None  # no teacher was built
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm", "alpha_t_mean", "w_mean", "dkl1_mean"):
        assert _losses(cached, key) == pytest.approx(_losses(live, key), rel=2e-5), key
    assert json.loads((caches / "exact" / "manifest.json").read_text())["samples"] == 0


def test_sparse_cache_run_resumes_exactly(tiny_assets, tmp_path, caches):
    """Stopped after step k and resumed, a run from the cache continues with the same losses (the sampler's
    state selects the same dataset indices, so the same cached rows)."""
    common = dict(
        epochs=2,
        max_steps_per_epoch=2,
        save_every_n_steps=1,
        keep_last_n_checkpoints=None,
        teacher_cache=str(caches / "sparse"),
    )
    full = run_in_process(tiny_cfg(tiny_assets, tmp_path / "full", **common))
    assert len(full.metrics_history) == 4 and all(m["kd_loss"] > 0 for m in full.metrics_history)
    for k in (1, 2):
        out = tmp_path / f"resume_{k}"
        shutil.copytree(full._checkpoint_root / f"step_{k:07d}", out / "checkpoints" / f"step_{k:07d}")
        resumed = run_in_process(tiny_cfg(tiny_assets, out, resume_from_checkpoint=True, **common))
        assert _losses(resumed) == _losses(full)[k:]
        assert _losses(resumed, "grad_norm") == _losses(full, "grad_norm")[k:]


def _problems(cfg) -> list[str]:
    return [f"{p.key}: {p.message}" for p in validate_config(cfg, check_lock=False)]


def test_mismatched_or_missing_cache_is_refused_before_compute(tiny_assets, tmp_path, caches):
    def cfg(**kw):
        return tiny_cfg(tiny_assets, tmp_path / "run", **kw)

    assert _problems(cfg(teacher_cache=str(caches / "sparse"))) == []
    (missing,) = _problems(cfg(teacher_cache=str(tmp_path / "nope")))
    assert "is not a directory" in missing
    (too_big,) = _problems(cfg(teacher_cache=str(caches / "sparse"), **{"kd_loss.top_k": 20}))
    assert "top_k=20 exceeds the cache's k_max=16" in too_big
    (corpus,) = _problems(cfg(teacher_cache=str(caches / "sparse"), **{"tokenizer.max_seq_len": 40}))
    assert "another corpus" in corpus
    jsd = cfg(teacher_cache=str(caches / "sparse"))
    jsd.kd_loss = {"_component_": "tad_torchtune.JSDLoss", "num_output_chunks": 4}
    (kind,) = _problems(jsd)
    assert "serves tad_torchtune.TADLoss" in kind
    edited = tmp_path / "edited"
    shutil.copytree(caches / "sparse", edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    (edited / "manifest.json").write_text(json.dumps(dict(manifest, vocab_size=V_STUDENT + 5)))
    (vocab,) = _problems(cfg(teacher_cache=str(edited)))
    assert f"vocabulary of {V_STUDENT + 5}, the student has {V_STUDENT}" in vocab
    (edited / "manifest.json").unlink()
    (incomplete,) = _problems(cfg(teacher_cache=str(edited)))
    assert "has no manifest.json" in incomplete
    # The recipe itself refuses with the same message (one ConfigValidationError, nothing trained).
    with pytest.raises(Exception, match="exceeds the cache's k_max=16"):
        run_in_process(cfg(teacher_cache=str(caches / "sparse"), **{"kd_loss.top_k": 20}))


def test_reader_refuses_rows_of_other_tokens(caches):
    cache = tc.TeacherCache(caches / "sparse")
    rec, _ = cache.sequence(0)
    tokens = torch.zeros(1, rec.top_ids.size(0), dtype=torch.long)
    with pytest.raises(tc.TeacherCacheError, match="differ from those the teacher cache"):
        cache.batch([0], tokens)


def test_interrupted_write_resumes_to_identical_shards(tmp_path):
    """A write killed after two shards resumes from them; every file equals an uninterrupted write's."""
    g = torch.Generator().manual_seed(0)
    items = [{"tokens": torch.randint(0, 50, (int(n),), generator=g).tolist()} for n in torch.randint(3, 9, (20,))]
    items = [dict(it, labels=it["tokens"]) for it in items]
    weight = torch.randn(50, 50, generator=g)

    def collate(batch):
        length = max(len(it["tokens"]) for it in batch)
        return {"tokens": torch.tensor([it["tokens"] + [0] * (length - len(it["tokens"])) for it in batch])}

    calls = {"n": 0, "limit": None}

    def teacher(batch):
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise KeyboardInterrupt
        return weight[batch["tokens"]] * 2

    kw = dict(vocab_size=50, k_max=5, samples=3, seed=7, batch_size=3, sequences_per_shard=4, progress=False)
    tc.write_teacher_cache(teacher, items, collate, tmp_path / "whole", **kw)
    calls.update(n=0, limit=3)  # 9 sequences seen: shards 0-1 complete, shard 2 pending
    with pytest.raises(KeyboardInterrupt):
        tc.write_teacher_cache(teacher, items, collate, tmp_path / "resumed", **kw)
    done = sorted(p.name for p in (tmp_path / "resumed").glob("shard_*"))
    assert done == ["shard_00000.safetensors", "shard_00001.safetensors"]
    calls.update(n=0, limit=None)
    tc.write_teacher_cache(teacher, items, collate, tmp_path / "resumed", **kw)
    assert calls["n"] == 4  # sequences 8-19 only
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert whole == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
