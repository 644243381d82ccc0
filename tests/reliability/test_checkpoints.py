"""Crash-safe step checkpoints: manifests, newest intact choice, stale partial writes, pruning, safe loading."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tad_torchtune.checkpoint.manifest import MANIFEST, sha256_file, verify_manifest
from tad_torchtune.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from tad_torchtune.checkpoint.steps import (
    FILES,
    find_latest_checkpoint,
    list_checkpoints,
    load_step_checkpoint,
    rng_state,
    save_step_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _save(root: Path, step: int, keep: int | None = None) -> Path:
    model = {"w": torch.full((4, 4), float(step))}
    optim = {"state": {0: {"exp_avg": torch.ones(4) * step, "step": torch.tensor(float(step))}}, "param_groups": []}
    recipe = {"global_step": step, "rng": [rng_state()], "dataloader": [{"pos": step}], "world_size": 1}
    return save_step_checkpoint(root, step, model, optim, recipe, keep_last_n=keep)


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    path = _save(tmp_path, 3)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 3 and sorted(manifest["files"]) == sorted(FILES)
    for name, meta in manifest["files"].items():
        assert meta["sha256"] == sha256_file(path / name) and meta["bytes"] == (path / name).stat().st_size
    assert verify_manifest(path, FILES) is None
    model, optim, recipe = load_step_checkpoint(path)  # weights-only load, NumPy RNG state included
    assert torch.equal(model["w"], torch.full((4, 4), 3.0)) and recipe["global_step"] == 3
    np.random.set_state(recipe["rng"][0]["numpy"])  # the restored NumPy state is usable
    random.setstate(recipe["rng"][0]["python"])


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("flip_byte", "does not match its SHA-256"),
        ("truncate", "bytes, the manifest says"),
        ("delete_file", "optimizer.pt is missing"),
        ("delete_manifest", "no manifest.json"),
        ("garble_manifest", "unreadable manifest.json"),
    ],
)
def test_resume_skips_broken_newest_with_a_warning(tmp_path, caplog, damage, reason):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    newest = tmp_path / "step_0000006"
    if damage == "flip_byte":
        data = bytearray((newest / "model.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "model.pt").write_bytes(bytes(data))
    elif damage == "truncate":
        with open(newest / "optimizer.pt", "r+b") as f:
            f.truncate(100)
    elif damage == "delete_file":
        (newest / "optimizer.pt").unlink()
    elif damage == "delete_manifest":
        (newest / MANIFEST).unlink()
    else:
        (newest / MANIFEST).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        chosen = find_latest_checkpoint(tmp_path)
    if damage == "delete_file":
        # list_checkpoints already treats a folder missing a file as incomplete (no warning needed).
        assert chosen.name == "step_0000004"
        return
    assert chosen.name == "step_0000004"
    assert any("step_0000006" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text


def test_interrupted_writes_are_ignored_then_cleaned(tmp_path):
    _save(tmp_path, 2)
    (tmp_path / "step_0000004.tmp-999").mkdir()  # a write killed before the rename
    (tmp_path / "step_0000004.tmp-999" / "model.pt").write_bytes(b"partial")
    assert find_latest_checkpoint(tmp_path).name == "step_0000002"
    _save(tmp_path, 4)
    assert not (tmp_path / "step_0000004.tmp-999").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000004"]


def test_keep_last_n_and_rewrite_same_step(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    _save(tmp_path, 4, keep=2)  # a resumed run writing the same step again
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    assert verify_manifest(tmp_path / "step_0000004", FILES) is None


def _evil(path: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": torch.zeros(2), "payload": Payload()}, path)
    return path


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pt"):
        safe_load(evil)
    assert not marker.exists()
    # The same file loaded unsafely would run the payload: the test's payload is real.
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    # A step checkpoint whose recipe state was tampered with (manifest rewritten to match) is refused too.
    path = _save(tmp_path / "ckpts", 2)
    _evil(path / "recipe_state.pt", marker)
    from tad_torchtune.checkpoint.manifest import write_manifest

    write_manifest(path, 2)
    with pytest.raises(UnsafeCheckpointError):
        load_step_checkpoint(path)
    assert not marker.exists()

    # torchtune's own checkpointer (initial student / teacher weights) also loads weights-only.
    from torchtune.training import FullModelTorchTuneCheckpointer

    (tmp_path / "in").mkdir()
    _evil(tmp_path / "in" / "model.pt", marker)
    ckpt = FullModelTorchTuneCheckpointer(
        checkpoint_dir=str(tmp_path / "in"),
        checkpoint_files=["model.pt"],
        model_type="QWEN2",
        output_dir=str(tmp_path / "o"),
    )
    with pytest.raises(Exception, match="Unable to load checkpoint"):
        ckpt.load_checkpoint()
    assert not marker.exists()


def test_no_trust_remote_code_and_no_unsafe_torch_load_in_package():
    src = REPO_ROOT / "tad_torchtune"
    offenders = []
    for p in src.rglob("*.py"):
        text = p.read_text()
        if "trust_remote_code=True" in text or "weights_only=False" in text:
            offenders.append(str(p.relative_to(REPO_ROOT)))
    assert offenders == []
