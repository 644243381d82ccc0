"""Atomic, resumable step checkpoints for the ``knowledge_distillation_tad`` recipe.

Layout (``output_dir/checkpoints/step_0000100/``):

- ``model.pt``: the student's full state dict (torchtune key names, on CPU; gathered from FSDP2 shards).
- ``optimizer.pt``: the full optimizer state dict (``training.get_full_optimizer_state_dict`` under FSDP2).
- ``recipe_state.pt``: step counters, LR scheduler, per-rank dataloader positions and RNG states, seed.

A checkpoint is first written to ``step_N.tmp-<pid>`` and then renamed into place, so a crash leaves
either the previous complete checkpoint or a ``.tmp`` folder that :func:`find_latest_checkpoint` ignores;
a folder named ``step_N`` is always complete. Pruning renames a folder to ``step_N.del-<pid>`` before deleting
it, so a crash mid-delete never leaves a half-deleted ``step_N``; leftovers are removed at the next start.
Only checkpoints of the writing run (same run id in the manifest) are ever pruned.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tad_torchtune.checkpoint.manifest import (
    newest_verified,
    read_run_record,
    remove_stale_partials,
    write_manifest,
)
from tad_torchtune.checkpoint.safe_load import safe_load
from tad_torchtune.reliability.fault import fault_point

_STEP_DIR = re.compile(r"^step_(\d+)$")
FILES = ("model.pt", "optimizer.pt", "recipe_state.pt")


def rng_state() -> dict[str, Any]:
    """Every RNG state one process uses: torch CPU, CUDA (when present), Python, NumPy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_step_checkpoint(
    checkpoint_root: str | Path,
    step: int,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    recipe_state: dict[str, Any],
    keep_last_n: int | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """Writes one step checkpoint atomically (call on one process only).

    Args:
        checkpoint_root (str | Path): folder holding the ``step_N`` folders.
        step (int): global optimizer step; the folder is ``step_{step:07d}``.
        model_state (dict): full model state dict.
        optimizer_state (dict): full optimizer state dict.
        recipe_state (dict): everything else needed to continue exactly.
        keep_last_n (int | None): delete older complete checkpoints of this run beyond this many. Default: None
            (keep all)
        run (dict | None): the run's record for the manifest (``run_identity.run_record``); with it, only folders
            whose manifest names the same run id are pruned. Default: None (prune any)

    Returns:
        Path: the final checkpoint folder.
    """
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, obj in zip(FILES, (model_state, optimizer_state, recipe_state), strict=True):
        with open(tmp / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if name == FILES[0]:
            fault_point("mid_checkpoint", step)  # a no-op unless a crash test installed a hook
    # The manifest (sizes + SHA-256) is written last: a folder without a valid one is never resumed from.
    write_manifest(tmp, step, run=run)
    fault_point("before_rename", step)
    if final.exists():
        # Same step written again (e.g. a resumed run saving at its first step): move the old one aside first.
        trash = root / f"{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    fault_point("after_rename", step)
    remove_stale_partials(root)  # .tmp folders of writes a crash interrupted
    if keep_last_n is not None and keep_last_n > 0:
        run_id = run.get("id") if run is not None else None
        own = [p for p in list_checkpoints(root) if run_id is None or (read_run_record(p) or {}).get("id") == run_id]
        for old in own[:-keep_last_n]:
            _delete_atomically(old, step)
    return final


def _delete_atomically(folder: Path, step: int) -> None:
    """Renames ``folder`` aside (one atomic step: it stops being a checkpoint), then deletes it."""
    trash = folder.with_name(f"{folder.name}.del-{os.getpid()}")
    os.replace(folder, trash)
    _fsync_dir(folder.parent)
    fault_point("mid_prune", step)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete step checkpoints under ``checkpoint_root``, oldest first (``.tmp`` folders are skipped)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(checkpoint_root: str | Path) -> Path | None:
    """The newest complete step checkpoint whose manifest checks out, or None (newer broken ones are skipped
    with a warning naming them)."""
    return newest_verified(list_checkpoints(checkpoint_root), required=FILES)


def load_step_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Reads ``(model_state, optimizer_state, recipe_state)`` from a step checkpoint folder (CPU tensors)."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete step checkpoint (missing {missing})")
    # weights_only loads only (NumPy's RNG-state types allowlisted): a tampered file cannot run code.
    model = safe_load(path / "model.pt", mmap=True)
    optim = safe_load(path / "optimizer.pt")
    recipe = safe_load(path / "recipe_state.pt")
    return model, optim, recipe
