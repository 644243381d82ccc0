"""The offline pass: fixed shards, atomic files, exact resume after a crash, ranks, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tad_torchtune.offline import OfflinePassMismatchError, WindowSource, load_pass, read_manifest, run_pass
from tad_torchtune.offline.miniplm import DifferenceScoreWriter
from tests.offline.conftest import L

SHARD, BATCH = 7, 3  # a shard is not a multiple of the batch: the last batch of each shard is short


class _Crash(RuntimeError):
    pass


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*"))}


def _run(tiny, models, out, **kw):
    src = WindowSource(tiny / "data" / "train.bin", max_seq_len=L, max_windows=40)
    return run_pass(src, DifferenceScoreWriter(*models), out, shard_size=SHARD, batch_size=BATCH, progress=False, **kw)


@pytest.fixture(scope="module")
def reference_pass(tiny, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    manifest = _run(tiny, models, out)
    return out, manifest


def test_a_complete_pass_has_every_instance_once_in_fixed_shards(reference_pass):
    out, manifest = reference_pass
    assert manifest["complete"] and manifest["num_shards"] == 6  # ceil(40 / 7)
    assert read_manifest(out)["complete"]
    data = load_pass(out)
    np.testing.assert_array_equal(data["index"], np.arange(40))
    assert data["score"].shape == (40,) and np.isfinite(data["score"]).all()
    assert not list(out.glob("*.tmp-*"))


def test_a_killed_pass_resumes_to_byte_identical_shards(tiny, models, reference_pass, tmp_path):
    ref_out, _ = reference_pass

    def crash_after_2(shard: int) -> None:
        if shard == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _run(tiny, models, tmp_path, after_shard=crash_after_2)
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == [f"shard_{s:05d}.safetensors" for s in range(3)]
    assert not read_manifest(tmp_path)["complete"]
    with pytest.raises(ValueError, match="not complete"):
        load_pass(tmp_path)
    # A write that died half-way (temp file) and a damaged shard: neither is taken as complete.
    (tmp_path / "shard_00003.safetensors.tmp-999").write_bytes(b"half")
    (tmp_path / "shard_00001.safetensors").write_bytes(b"garbage")
    written = []
    _run(tiny, models, tmp_path, after_shard=written.append)
    assert written == [1, 3, 4, 5]  # shards 0 and 2 were kept
    assert _files(tmp_path) == _files(ref_out)
    assert read_manifest(tmp_path)["complete"]


def test_two_ranks_write_the_same_files_as_one(tiny, models, reference_pass, tmp_path):
    ref_out, _ = reference_pass
    m0 = _run(tiny, models, tmp_path, rank=0, world_size=2)
    assert not m0["complete"]  # rank 1's shards are missing
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == [f"shard_{s:05d}.safetensors" for s in (0, 2, 4)]
    m1 = _run(tiny, models, tmp_path, rank=1, world_size=2)
    assert m1["complete"]
    assert _files(tmp_path) == _files(ref_out)
    assert (tmp_path / "manifest.json").read_bytes() == (ref_out / "manifest.json").read_bytes()


def test_batch_size_does_not_change_the_scores(tiny, models, reference_pass, tmp_path):
    src = WindowSource(tiny / "data" / "train.bin", max_seq_len=L, max_windows=40)
    run_pass(src, DifferenceScoreWriter(*models), tmp_path, shard_size=SHARD, batch_size=7, progress=False)
    a, b = load_pass(reference_pass[0]), load_pass(tmp_path)
    np.testing.assert_allclose(a["score"], b["score"], rtol=0, atol=1e-5)


def test_another_model_or_corpus_is_refused_naming_what_changed(tiny, models, reference_pass, tmp_path):
    out = tmp_path / "p"
    _run(tiny, models, out)
    teacher, ref = models
    with pytest.raises(OfflinePassMismatchError, match=r"writer_settings\.reference\.fingerprint"):
        run_pass(
            WindowSource(tiny / "data" / "train.bin", max_seq_len=L, max_windows=40),
            DifferenceScoreWriter(teacher, teacher),
            out,
            shard_size=SHARD,
            progress=False,
        )
    with pytest.raises(OfflinePassMismatchError, match=r"source\.num_instances: 40 -> 41"):
        run_pass(
            WindowSource(tiny / "data" / "train.bin", max_seq_len=L, max_windows=41),
            DifferenceScoreWriter(*models),
            out,
            shard_size=SHARD,
            progress=False,
        )
    before = json.loads((out / "manifest.json").read_text())
    manifest = run_pass(
        WindowSource(tiny / "data" / "train.bin", max_seq_len=L, max_windows=41),
        DifferenceScoreWriter(*models),
        out,
        shard_size=SHARD,
        progress=False,
        overwrite=True,
    )
    assert manifest["complete"] and manifest["identity_hash"] != before["identity_hash"]
    assert len(load_pass(out)["score"]) == 41


def test_bad_arguments_are_refused(tiny, models, tmp_path):
    src = WindowSource(tiny / "data" / "train.bin", max_seq_len=L, max_windows=4)
    with pytest.raises(ValueError, match="shard_size"):
        run_pass(src, DifferenceScoreWriter(*models), tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="rank 2"):
        run_pass(src, DifferenceScoreWriter(*models), tmp_path, rank=2, world_size=2)
    with pytest.raises(TypeError, match="not an offline Writer"):
        run_pass(src, object(), tmp_path)


_KILLED_SCRIPT = """
import os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tad_torchtune.offline import WindowSource, run_pass
from tad_torchtune.offline.miniplm import DifferenceScoreWriter
from tad_torchtune.offline.models import load_model
from tad_torchtune.training.tiny import tiny_config

tiny, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = tiny_config(tiny, tiny / "unused_out")
models = (load_model(cfg, "teacher_model", "teacher_checkpointer", device="cpu", dtype="fp32"),
          load_model(cfg, "model", "checkpointer", device="cpu", dtype="fp32"))
src = WindowSource(tiny / "data" / "train.bin", max_seq_len=16, max_windows=40)

def die(shard):
    if shard == 2:
        os._exit(137)  # no cleanup, no exception handling: as a SIGKILL right after shard 2 is in place

run_pass(src, DifferenceScoreWriter(*models), out, shard_size=7, batch_size=3, progress=False, after_shard=die)
"""


@pytest.mark.integration_test
def test_a_process_killed_mid_pass_resumes_byte_identical(tiny, models, reference_pass, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SCRIPT, str(tiny), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("shard_*"))) == 3 and not read_manifest(tmp_path)["complete"]
    _run(tiny, models, tmp_path)
    assert _files(tmp_path) == _files(reference_pass[0])
