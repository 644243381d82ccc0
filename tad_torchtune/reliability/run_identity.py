"""Which run owns an ``output_dir``: an exclusive lock, a run id in every checkpoint, config drift on resume.

- :class:`RunLock`: ``output_dir/.tad_run.lock`` held with ``flock`` for the whole run by the writing process. A
  second process opening the same folder is refused while the first lives; the kernel drops the lock when
  its holder dies (even by SIGKILL), so a stale lock file from a dead run is simply taken over.
- :func:`run_record`: the run id, the config's fingerprint, the world size and the resolved config, written into
  every checkpoint's ``manifest.json``; a run prunes and resumes only checkpoints carrying its own id.
- :func:`compare_configs`: on resume, keys that change what the run computes (models, data, batch geometry,
  world size, losses, seed, optimizer kind) are refused with old and new values; keys that may change between
  restarts (epochs, logging, saving, learning rate and schedule, performance switches) are reported as changes.
- :func:`output_dir_problems`: the start-up check of ``output_dir`` (a writable folder no live run holds).
- :class:`ParentWatch`: a worker whose launcher (``torchrun``'s agent) died stops at the next step boundary.

All of this runs before any model is built. See ``docs/reliability.md``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

LOCK_NAME = ".tad_run.lock"

# Top-level keys that may differ between a run and its resume: they do not change what a step computes.
BENIGN_KEYS = frozenset(
    """
    epochs max_steps_per_epoch log_every_n_steps log_peak_memory_stats log_flops peak_flops metric_logger
    save_every_n_steps keep_last_n_checkpoints resume_from_checkpoint output_dir lr_scheduler clip_grad_norm
    nonfinite_policy compile enable_activation_checkpointing custom_sharded_layers fused_loss fused_chunk_size
    device checkpointer progress_bar
    """.split()
)
# Not benign (so refused on resume when changed): teacher_cache, whose rows are the teacher of every step.
# Dotted keys that may differ although their section may not (the optimizer's kind and betas may not change;
# every on_policy key but the teacher log-prob metric changes what is trained on).
BENIGN_PATHS = frozenset({"optimizer.lr", "on_policy.log_teacher_logprob"})
# Leaf names that are only where things are written (they follow output_dir).
BENIGN_LEAVES = frozenset({"output_dir", "log_dir"})


class RunLockError(RuntimeError):
    """Another live process holds the output folder's run lock."""


class LauncherGoneError(RuntimeError):
    """The process that launched this worker (torchrun's agent) died; the worker stops instead of running on."""


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.tad_run.lock`` for the lifetime of a run.

    Locks are per open file: a second process (or a second open in this one) is refused at once. The file holds
    the holder's pid, host and start time, for the refusal message; it is left in place on release.

    Args:
        output_dir (str | Path): the run's folder (created if missing).
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock or raises :class:`RunLockError` naming the holder and what to do."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockError(
                f"output_dir {self.path.parent} is in use by another run ({holder}); two runs in one folder would "
                "prune and resume each other's checkpoints. Wait for it to end, stop it, or use another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def holder(output_dir: str | Path) -> str | None:
        """Who holds ``output_dir``'s lock right now (None: nobody). Reads only; creates nothing."""
        path = Path(output_dir) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Drops the lock (also dropped by the kernel when the process ends)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __del__(self) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None


def output_dir_problems(output_dir: Any, *, check_lock: bool = True) -> list[tuple[str, str]]:
    """The start-up check of ``output_dir`` (``tad-tune validate``): given, a folder (or creatable as one), not
    locked by another live run, writable (a probe file in the nearest existing folder, removed at once).

    Args:
        output_dir (Any): the config's ``output_dir`` (None when missing).
        check_lock (bool): refuse a folder whose :class:`RunLock` another process holds. Default: True

    Returns:
        list[tuple[str, str]]: at most one ``("output_dir", message)``.
    """
    if output_dir is None:
        return [("output_dir", "is required")]
    path = Path(str(output_dir))
    if path.exists() and not path.is_dir():
        return [("output_dir", f"{path} exists and is not a folder")]
    holder = RunLock.holder(path) if check_lock else None
    if holder is not None:
        return [
            (
                "output_dir",
                f"{path} is in use by another run ({holder}); wait for it to end, stop it, or use another output_dir",
            )
        ]
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return [("output_dir", f"{path} cannot be created: {probe_dir} is a file, not a folder")]
    try:
        fd, name = tempfile.mkstemp(prefix=".tad_write_probe_", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        where = "" if probe_dir == path else f" (its nearest existing parent {probe_dir})"
        return [("output_dir", f"{path}{where} is not writable ({err.strerror})")]
    return []


def new_run_id() -> str:
    """A fresh run id: time-ordered prefix + random suffix (``20261130-184000-3f9a1c``)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists are leaves)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _benign(key: str) -> bool:
    top = key.split(".", 1)[0]
    return top in BENIGN_KEYS or key in BENIGN_PATHS or key.rsplit(".", 1)[-1] in BENIGN_LEAVES


def config_fingerprint(config: dict[str, Any], world_size: int) -> str:
    """SHA-256 (16 hex) of the keys that fix what the run computes (everything but the benign keys) and the
    world size: two configs with one fingerprint may resume each other."""
    meaning = {k: v for k, v in _flatten(config).items() if not _benign(k)}
    meaning["<world_size>"] = world_size
    blob = json.dumps(meaning, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_record(run_id: str, config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What every checkpoint's manifest records about the run that wrote it (JSON-serialisable).

    Args:
        run_id (str): the run's id (kept across resumes).
        config (dict): the resolved config (``OmegaConf.to_container(cfg, resolve=True)``).
        world_size (int): processes of the run.
    """
    return {
        "id": run_id,
        "config_fingerprint": config_fingerprint(config, world_size),
        "world_size": world_size,
        "config": json.loads(json.dumps(config, default=str)),
    }


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if value is not _MISSING else "(absent)"
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()


def compare_configs(
    old: dict[str, Any], new: dict[str, Any], old_world_size: int | None, new_world_size: int
) -> tuple[list[str], list[str]]:
    """Differences between the config a checkpoint was written with and the resuming config.

    Args:
        old (dict): the checkpoint's resolved config.
        new (dict): the resuming run's resolved config.
        old_world_size (int | None): processes that wrote the checkpoint (None: unknown).
        new_world_size (int): processes of the resuming run.

    Returns:
        tuple[list[str], list[str]]: (refused, changed), one ``"key: old -> new"`` line per differing key.
    """
    a, b = _flatten(old), _flatten(new)
    refused, changed = [], []
    if old_world_size is not None and old_world_size != new_world_size:
        refused.append(f"world size: {old_world_size} -> {new_world_size} process(es)")
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va == vb:
            continue
        (changed if _benign(key) else refused).append(f"{key}: {_show(va)} -> {_show(vb)}")
    return refused, changed


class ParentWatch:
    """Notices that the process which started this one is gone (its parent pid changed).

    ``torchrun`` workers are children of the elastic agent; if the agent is killed (SIGKILL, a lost node
    allocation), the workers are re-parented and would otherwise train on unattended, writing checkpoints
    into a folder a restarted job may also use. :meth:`check` at every step boundary stops them there.
    """

    def __init__(self) -> None:
        self.parent = os.getppid()

    def check(self) -> None:
        """Raises :class:`LauncherGoneError` when the original parent process has ended."""
        if os.getppid() != self.parent:
            raise LauncherGoneError(
                f"the launcher of this worker (pid {self.parent}) has exited; stopping at this step boundary "
                "instead of training unattended. Resume with resume_from_checkpoint=true from the last checkpoint"
            )
