"""Checkpoint manifests: one ``manifest.json`` per checkpoint folder with the size and SHA-256 of every file.

The manifest is written last, inside the temporary folder, just before the atomic rename; a folder is a
*complete* checkpoint only if its manifest exists, parses, and every file it lists has the recorded size
and hash (and no listed file is missing). Anything else is incomplete or corrupt and is skipped on resume.

The manifest also records which run wrote the checkpoint (``run``: run id, config fingerprint, world size and the
resolved config; :mod:`tad_torchtune.reliability.run_identity`), so a run never prunes or resumes another's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from torchtune import utils

MANIFEST = "manifest.json"
_FORMAT = "tad_torchtune.checkpoint/1"
_BLOCK = 1 << 22  # 4 MiB reads: hashing runs at disk speed
log = utils.get_logger("INFO")
_VERIFIED: set[tuple] = set()  # (folder, per-file (name, size, mtime_ns, inode, sha256)) already hashed OK
_WARNED: set[tuple[str, str]] = set()  # (folder, reason) already warned about: validation and resume share a process


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, step: int | None = None, run: dict | None = None) -> Path:
    """Hashes every file in ``folder`` (not sub-folders) and writes ``folder/manifest.json`` durably.

    Args:
        folder (str | Path): the (temporary) checkpoint folder, already holding its fsynced files.
        step (int | None): global step, recorded for humans. Default: None
        run (dict | None): the writing run's identity (JSON-serialisable; ``run_identity.run_record``). Default: None

    Returns:
        Path: the manifest path.
    """
    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    out = folder / MANIFEST
    with open(out, "w") as f:
        record = {"format": _FORMAT, "step": step, "files": files}
        if run is not None:
            record["run"] = run
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return out


def verify_manifest(folder: str | Path, required: tuple[str, ...] = ()) -> str | None:
    """Checks a checkpoint folder against its manifest.

    Args:
        folder (str | Path): the checkpoint folder.
        required (tuple[str, ...]): file names that must be listed (e.g. ``model.pt``). Default: ()

    Returns:
        str | None: None when complete and intact, else one sentence saying what is wrong.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (the write did not finish)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    stats = []
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        st = p.stat()
        if st.st_size != meta["bytes"]:
            return f"{name} has {st.st_size} bytes, the manifest says {meta['bytes']} (truncated or overwritten)"
        stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino, meta["sha256"]))
    # Start-up validation and the resume both verify the same folder: hash unchanged files only once.
    key = (str(folder.resolve()), tuple(stats))
    if key in _VERIFIED:
        return None
    for name, meta in files.items():
        if sha256_file(folder / name) != meta["sha256"]:
            return f"{name} does not match its SHA-256 in {MANIFEST} (corrupted)"
    _VERIFIED.add(key)
    return None


def newest_verified(candidates: list[Path], required: tuple[str, ...] = ()) -> Path | None:
    """The newest folder of ``candidates`` (oldest first) that passes :func:`verify_manifest`, or None.

    Every newer folder that fails is skipped with a warning naming it and the reason.
    """
    for path in reversed(candidates):
        problem = verify_manifest(path, required)
        if problem is None:
            return path
        if (str(path), problem) not in _WARNED:
            _WARNED.add((str(path), problem))
            log.warning(f"skipping checkpoint {path}: {problem}; trying the previous one")
    return None


def read_run_record(folder: str | Path) -> dict | None:
    """The ``run`` record of a checkpoint's manifest (None when absent: no manifest, or one written before runs
    were recorded)."""
    try:
        run = json.loads((Path(folder) / MANIFEST).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def remove_stale_partials(root: str | Path) -> list[Path]:
    """Deletes ``step_*.tmp-*`` / ``.old-*`` / ``.del-*`` folders a crash left behind (an interrupted write, same-step
    rewrite or prune); call only from the process that holds the run lock."""
    removed = []
    for p in Path(root).glob("step_*.*-*"):
        if p.is_dir() and any(tag in p.name for tag in (".tmp-", ".old-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
