"""The recipe trained from a teacher cache: equal to the live teacher when the cache is exact, exact resume,
refusals before compute; the CLI writer resumes an interrupted write byte for byte."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

from tad_torchtune.offline import teacher_cache as tc
from tad_torchtune.offline.teacher_cache_cli import main as cache_main
from tad_torchtune.testing.tiny import TINY_CONFIG_PATH
from tad_torchtune.validate import validate_config
from tests.recipes.conftest import read_disk_log, run_cli, run_in_process, tiny_cfg

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


@pytest.mark.parametrize("kd_loss", ["tad_torchtune.TADLoss", "tad_torchtune.ForwardKLLoss"])
def test_exact_cache_run_equals_live_teacher_run(tiny_assets, tmp_path, caches, kd_loss):
    """K_max = V: every teacher probability is cached, so CE, the divergence and the training trajectory equal
    the live teacher's (same chunked-logits path; float rounding only)."""
    node = {"_component_": kd_loss, "num_output_chunks": 4}
    if kd_loss.endswith("TADLoss"):
        node.update(top_k=10, beta=2.0)
    runs = {}
    for name, cache in (("live", None), ("cache", str(caches / "exact"))):
        cfg = tiny_cfg(tiny_assets, tmp_path / name, max_steps_per_epoch=4, fused_loss=False, teacher_cache=cache)
        cfg.kd_loss = node
        runs[name] = run_in_process(cfg)
    live, cached = runs["live"], runs["cache"]
    assert cached._teacher_model is None  # no teacher was built
    keys = ["loss", "ce_loss", "kd_loss", "grad_norm"]
    keys += ["alpha_t_mean", "w_mean", "dkl1_mean"] if kd_loss.endswith("TADLoss") else []
    for key in keys:
        assert _losses(cached, key) == pytest.approx(_losses(live, key), rel=2e-5), key
    assert tc.read_manifest(caches / "exact")["samples"] == 0


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


def test_bf16_run_from_cache_is_finite_and_close(tiny_assets, tmp_path, caches):
    """dtype: bf16 (bf16 student logits, fp32 loss maths) from the cache: finite, near the fp32 run's losses."""
    cache = str(caches / "sparse")
    runs = {}
    for dtype in ("fp32", "bf16"):
        cfg = tiny_cfg(tiny_assets, tmp_path / dtype, max_steps_per_epoch=2, dtype=dtype, teacher_cache=cache)
        runs[dtype] = run_in_process(cfg)
    for key in ("loss", "kd_loss", "grad_norm"):
        assert all(math.isfinite(v) for v in _losses(runs["bf16"], key)), key
    assert _losses(runs["bf16"], "kd_loss") == pytest.approx(_losses(runs["fp32"], "kd_loss"), rel=0.05)


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
    manifest["identity"]["writer_settings"]["vocab_size"] = V_STUDENT + 5
    (edited / "manifest.json").write_text(json.dumps(manifest))
    (vocab,) = _problems(cfg(teacher_cache=str(edited)))
    assert f"vocabulary of {V_STUDENT + 5}, the student has {V_STUDENT}" in vocab
    (edited / "manifest.json").unlink()
    (incomplete,) = _problems(cfg(teacher_cache=str(edited)))
    assert "manifest.json missing" in incomplete
    # The recipe itself refuses with the same message (one ConfigValidationError, nothing trained).
    with pytest.raises(Exception, match="exceeds the cache's k_max=16"):
        run_in_process(cfg(teacher_cache=str(caches / "sparse"), **{"kd_loss.top_k": 20}))


def test_cli_refusals(tiny_assets, tmp_path):
    args = [
        "--config",
        str(TINY_CONFIG_PATH),
        "--no-progress",
        "--out",
        str(tmp_path / "c"),
        f"assets_dir={tiny_assets}",
    ]
    with pytest.raises(ValueError, match="kd_loss.top_k=10 > --k-max=4"):
        cache_main([*args, "--k-max", "4"])
    with pytest.raises(ValueError, match="--samples must be >= 1"):
        cache_main([*args, "--samples", "0"])
    with pytest.raises(ValueError, match="dataset.packed: true is not supported"):
        cache_main([*args, "dataset.packed=true"])
    assert not (tmp_path / "c").exists()  # nothing written


def test_reader_refuses_rows_of_other_tokens(caches):
    cache = tc.TeacherCache(caches / "sparse")
    rec, _ = cache.sequence(0)
    tokens = torch.zeros(1, rec.top_ids.size(0), dtype=torch.long)
    with pytest.raises(tc.TeacherCacheError, match="differ from those the teacher cache"):
        cache.batch([0], tokens)


def test_interrupted_write_resumes_to_identical_shards(tmp_path):
    """A pass killed after two shards resumes from them; every file equals an uninterrupted pass's, and the
    reader returns each item's records as records_from_logits computes them (its own generator)."""
    from tad_torchtune.offline.engine import run_pass

    g = torch.Generator().manual_seed(0)
    items = [{"tokens": torch.randint(0, 50, (int(n),), generator=g).tolist()} for n in torch.randint(3, 9, (20,))]
    items = [dict(it, labels=it["tokens"]) for it in items]
    weight = torch.randn(50, 50, generator=g)
    calls = {"n": 0}

    def teacher(tokens):
        calls["n"] += 1
        return weight[tokens] * 2

    def writer(dtype="fp32"):
        return tc.SparseTeacherWriter(teacher, {"name": "toy"}, vocab_size=50, k_max=5, samples=3, seed=7,
                                      logprob_dtype=dtype)  # fmt: skip

    kw = dict(shard_size=4, batch_size=3, progress=False)
    run_pass(tc.DatasetSource(items), writer(), tmp_path / "whole", **kw)

    def stop(shard):
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pass(tc.DatasetSource(items), writer(), tmp_path / "resumed", after_shard=stop, **kw)
    with pytest.raises(tc.TeacherCacheError, match="not complete"):
        tc.TeacherCache(tmp_path / "resumed")
    calls["n"] = 0
    run_pass(tc.DatasetSource(items), writer(), tmp_path / "resumed", **kw)
    assert calls["n"] == 6  # shards 2-4 only: 3 x 2 batches
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert whole == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    cache = tc.TeacherCache(tmp_path / "resumed")
    for i in (0, 7, 19):
        tokens = torch.tensor(items[i]["tokens"])
        expected = tc.records_from_logits(teacher(tokens), 5, 3, tc.sequence_generator(7, i))
        got, checksum = cache.sequence(i)
        assert checksum == int(tc.sequence_checksum(tokens))
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b.to(a.dtype))
    # Two processes (each its own shards, no communication) write the same files as one.
    for rank in (1, 0):
        run_pass(tc.DatasetSource(items), writer(), tmp_path / "two", rank=rank, world_size=2, **kw)
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # bf16 log-probs come back as the bf16 rounding of the fp32 ones.
    run_pass(tc.DatasetSource(items), writer("bf16"), tmp_path / "bf16", **kw)
    rec16, _ = tc.TeacherCache(tmp_path / "bf16").sequence(7)
    rec32, _ = cache.sequence(7)
    assert torch.equal(rec16.top_logp, rec32.top_logp.bfloat16().float())


def test_two_processes_write_and_train_like_one(tiny_assets, tmp_path):
    """Under torchrun, 2 processes write the same cache files as 1 (each its own shards), and a 2-process run
    from the cache (each rank reads its own items' rows) equals a 1-process run with the same global batch."""
    args = ["--config", str(TINY_CONFIG_PATH), "--k-max", "16", "--samples", "4", "--shard-size", "16"]
    args += ["--no-progress", f"assets_dir={tiny_assets}"]
    assert cache_main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m"]
    run_cli([*torchrun, "tad_torchtune.cli", "teacher-cache", *args, "--out", str(tmp_path / "two")])
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

    common = ["max_steps_per_epoch=3", f"teacher_cache={tmp_path / 'two'}", f"assets_dir={tiny_assets}"]
    run_cli([*torchrun, "tad_torchtune.recipes.kd_tad", "--config", str(TINY_CONFIG_PATH), "batch_size=2",
             f"output_dir={tmp_path / 'run2'}", *common])  # fmt: skip
    two = read_disk_log(tmp_path / "run2")
    one = run_in_process(
        tiny_cfg(tiny_assets, tmp_path / "run1", max_steps_per_epoch=3, teacher_cache=str(tmp_path / "one"))
    )
    assert len(two) == 3
    for r, m in zip(two, one.metrics_history, strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "alpha_t_mean", "w_mean", "num_tokens", "grad_norm"):
            assert r[key] == pytest.approx(m[key], rel=1e-5, abs=1e-6), key
