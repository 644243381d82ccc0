"""The offline teacher pass: stream a corpus through a model once and write something per instance, in shards.

One mechanism, several writers (MiniPLM scores, Seq-KD continuations, a sparse teacher cache): the pass owns
the instances, the sharding over processes, the batching, the shard files, the manifest, resume and progress;
a :class:`Writer` owns the model calls and says what to store for a batch.

Layout of an output folder ``out/``::

    out/manifest.json             identity (writer, its settings, model and corpus fingerprints, shard size) and,
                                  once every shard exists, ``"complete": true``
    out/shard_00000.safetensors   instances [0, S): the writer's arrays concatenated along axis 0, plus
    out/shard_00001.safetensors   ``index`` (int64 [n], the instance ids); header metadata: identity hash, range
    ...

Shards are fixed: shard ``s`` holds instances ``[s * shard_size, (s + 1) * shard_size)`` whatever the number
of processes, and batches never cross a shard boundary, so a shard's bytes do not depend on how many processes
wrote the folder (2 ranks give the same files as 1). Under ``torchrun`` rank ``r`` of ``W`` (from the ``RANK``
/ ``WORLD_SIZE`` environment) writes shards ``r, r + W, r + 2W, ...``; processes never communicate.

Crash safety: a shard is written to ``shard_XXXXX.safetensors.tmp-<pid>``, fsync'ed and renamed, so a file
with the final name is always complete (safetensors writes deterministic bytes: sorted keys, no timestamps).
A rerun with the same identity skips every complete shard and redoes the rest: the result is byte-identical
to an uninterrupted pass. A rerun with another corpus, model, tokenizer or setting is refused with one message
naming what changed (``overwrite=True`` / ``--overwrite`` starts again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "tad_torchtune.offline_pass"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD = "shard_{:05d}.safetensors"


class OfflinePassMismatchError(ValueError):
    """An output folder holds a pass made with another corpus, model, tokenizer or setting (a refusal)."""


# --------------------------------------------------------------------------------------------- fingerprints


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """sha256 (16 hex digits) of a file's bytes, read in 16 MB chunks (about 1 GB/s: seconds for 2B tokens)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module, max_elements_per_tensor: int = 1 << 16) -> str:
    """sha256 (16 hex digits) of a model's parameter names, shapes, dtypes and a strided sample of its values.

    The sample (at most ``max_elements_per_tensor`` evenly strided elements of each tensor, hashed as fp32)
    changes with any retraining or other checkpoint while costing milliseconds for a 14B model; two models that
    differ only in values the stride skips would collide, which no real checkpoint pair does.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not torch.is_tensor(t):
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // max_elements_per_tensor)
        sample = flat[::step][:max_elements_per_tensor].float().cpu().numpy()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def arrays_sha256(arrays: Sequence[np.ndarray]) -> str:
    """sha256 (16 hex digits) of a list of int arrays (lengths and values): the identity of a prompt list."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(np.int64(a.size).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ instances


class InstanceSource(Protocol):
    """What the pass iterates over: ``len()`` instances, each a 1-D int64 token array."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> np.ndarray: ...

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description that changes whenever the instances would (hashes, lengths)."""
        ...


class WindowSource:
    """The recipe's windows of a token file: instance ``i`` is :meth:`PackedTokenDataset.window` ``(i)``.

    ``max_seq_len + 1`` int64 ids per instance, the stride ``max_seq_len`` (the recipe's own windows, so a score
    or a cached distribution of instance ``i`` belongs to exactly the window the recipe trains on as item ``i``).

    Args:
        path (str | Path): token file (``.bin``) written by ``tad-tune tokenize``.
        max_seq_len (int): tokens the model sees per window (``L``).
        max_windows (int | None): only the first this many windows (quick runs). Default: None (all).
        prefix_len (int | None): instances are the first ``prefix_len`` ids of each window instead (Seq-KD
            prompts cut from pretraining text). Default: None.
    """

    def __init__(
        self, path: str | Path, max_seq_len: int, max_windows: int | None = None, prefix_len: int | None = None
    ):
        from tad_torchtune.data.packed import PackedTokenDataset

        self.ds = PackedTokenDataset(path, max_seq_len=max_seq_len)
        self.path = self.ds.paths[0]
        self.meta = self.ds.metas[0]
        n = len(self.ds)
        if max_windows is not None:
            if max_windows < 1:
                raise ValueError(f"max_windows must be >= 1, got {max_windows}")
            n = min(n, int(max_windows))
        self._n = n
        if prefix_len is not None and not 1 <= prefix_len <= max_seq_len:
            raise ValueError(f"prefix_len must be in [1, max_seq_len={max_seq_len}], got {prefix_len}")
        self.prefix_len = prefix_len
        self._sha: str | None = None

    def __len__(self) -> int:
        return self._n

    def get(self, index: int) -> np.ndarray:
        w = self.ds.window(index)
        return w[: self.prefix_len] if self.prefix_len is not None else w

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def identity(self) -> dict[str, Any]:
        if self._sha is None:
            self._sha = file_sha256(self.path)
        return {
            "kind": "token_file_windows",  # the content, not the path: a moved or remounted file is the same
            "sha256": self._sha,
            "num_tokens": self.meta["num_tokens"],
            "tokenizer": self.tokenizer_fingerprint,
            "max_seq_len": self.ds.max_seq_len,
            "num_instances": self._n,
            "prefix_len": self.prefix_len,
        }


class PromptSource:
    """A list of tokenised prompts (ORCAMEL questions, ...): instance ``i`` is ``prompts[i]``.

    Args:
        prompts (Sequence[Sequence[int]]): token ids per prompt.
        description (dict): where they came from (recorded in the manifest).
        tokenizer_fingerprint (str | None): fingerprint of the tokenizer that made them.
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        description: dict[str, Any] | None = None,
        tokenizer_fingerprint: str | None = None,
    ):
        self.prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        if not self.prompts:
            raise ValueError("no prompts: the prompt source is empty")
        empty = [i for i, p in enumerate(self.prompts) if p.size == 0]
        if empty:
            raise ValueError(f"prompt(s) {empty[:5]} are empty; drop them or fix the source")
        self.description = dict(description or {})
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self._sha = arrays_sha256(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, index: int) -> np.ndarray:
        return self.prompts[index]

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "prompts",
            **self.description,
            "sha256": self._sha,
            "tokenizer": self.tokenizer_fingerprint,
            "num_instances": len(self.prompts),
        }


@dataclass
class Batch:
    """Instances of one batch, right-padded.

    Attributes:
        indices (np.ndarray): int64 ``[B]`` instance ids.
        tokens (torch.Tensor): int64 ``[B, T]`` on the pass's device, right-padded with ``pad_id``.
        lengths (torch.Tensor): int64 ``[B]`` (on the device): real tokens per row.
        pad_id (int): the padding id (0: padded positions must be ignored through ``lengths``, never by value).
    """

    indices: np.ndarray
    tokens: torch.Tensor
    lengths: torch.Tensor
    pad_id: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def collate(source: InstanceSource, indices: Sequence[int], device: torch.device, pad_id: int = 0) -> Batch:
    """Right-padded :class:`Batch` of ``source`` instances ``indices``."""
    rows = [source.get(int(i)) for i in indices]
    lengths = [len(r) for r in rows]
    tokens = np.full((len(rows), max(lengths)), pad_id, dtype=np.int64)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return Batch(
        indices=np.asarray(indices, dtype=np.int64),
        tokens=torch.from_numpy(tokens).to(device),
        lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
        pad_id=pad_id,
    )


# -------------------------------------------------------------------------------------------------- writers


@runtime_checkable
class Writer(Protocol):
    """What a pass writes per batch (MiniPLM scores, Seq-KD continuations, a sparse teacher cache, ...).

    Attributes:
        kind (str): the writer's name, recorded in the manifest (``miniplm_score``, ``seqkd``, ...).
    """

    kind: str

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable settings and model fingerprints: a rerun with a different identity is refused."""
        ...

    def records(self, batch: Batch) -> dict[str, np.ndarray]:
        """Arrays for ``batch``; the pass concatenates each key along axis 0 over a shard's batches.

        An optional ``"_tokens"`` entry (not stored) gives the tokens the batch cost, for the tokens/s display.
        Per-instance values have first dimension ``B``; per-position values may be ``[B, L, ...]`` or flattened
        ragged arrays with a separate per-instance length array (the writer's reader splits them). Every
        batch must return the same keys with the same dtypes and trailing shapes. Results must not depend on
        which other instances share the batch if shards are to be identical across batch sizes.
        """
        ...


# ----------------------------------------------------------------------------------------------- the pass


def rank_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun sets them); ``(0, 1)`` otherwise."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def shard_path(out_dir: str | Path, shard: int) -> Path:
    return Path(out_dir) / _SHARD.format(shard)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = _flatten(old), _flatten(new)
    parts = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "")


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of an offline pass folder (complete or not)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no offline pass ({MANIFEST} missing); run the pass first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    return manifest


def _shard_meta(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {}).get("tad_torchtune", "{}"))
    except Exception:  # noqa: BLE001 - an unreadable file is treated as absent and rewritten
        return None


def _write_shard(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    from safetensors.numpy import save

    # One metadata entry holding sorted JSON: safetensors serialises its metadata map in hash order, which
    # would make two writes of the same shard differ by their headers.
    header = {"tad_torchtune": json.dumps(meta, sort_keys=True)}
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=header)
    _atomic_write_bytes(path, data)


def _prepare_folder(out_dir: Path, manifest: dict[str, Any], overwrite: bool, rank: int) -> None:
    """Create the folder and manifest, or check the existing one has the same identity (else refuse)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath = out_dir / MANIFEST
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("identity_hash") == manifest["identity_hash"]:
            return
        if not overwrite:
            what = _diff(old.get("identity", {}), manifest["identity"]) if old else "an unreadable manifest"
            raise OfflinePassMismatchError(
                f"{out_dir} holds an offline pass made with other inputs or settings ({what}); "
                "choose another output folder or pass --overwrite (overwrite=True) to start again"
            )
        # Only rank 0 clears (stale shards must not survive); the other ranks redo any shard whose header carries
        # the old identity. With several processes, run --overwrite once with one process first (docs/offline.md).
        if rank == 0:
            for p in out_dir.glob("shard_*.safetensors*"):
                p.unlink()
            mpath.unlink()
    if not mpath.is_file():
        _atomic_write_bytes(mpath, json.dumps(manifest, indent=1, sort_keys=True).encode())


def run_pass(
    source: InstanceSource,
    writer: Writer,
    out_dir: str | Path,
    *,
    shard_size: int = 1024,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``writer`` over every instance of ``source`` this rank owns, writing complete shards to ``out_dir``.

    Args:
        source (InstanceSource): the instances (:class:`WindowSource`, :class:`PromptSource`).
        writer (Writer): what to compute and store per batch.
        out_dir (str | Path): output folder (see the module docstring).
        shard_size (int): instances per shard (fixed for the folder: part of its identity). Default: 1024.
        batch_size (int): instances per model call; a shard's last batch may be smaller. Not part of the
            identity: a resume may change it (the writers' results do not depend on batch composition up to
            floating-point reduction order). Default: 8.
        device (torch.device | str): where batches go (the writer's models must be there). Default: ``"cpu"``.
        rank (int | None): this process's rank; None reads ``RANK``. Default: None.
        world_size (int | None): number of processes; None reads ``WORLD_SIZE``. Default: None.
        overwrite (bool): start again in a folder that holds another pass. Default: False.
        progress (bool): show a progress bar (rank 0 only) with tokens/s and ETA. Default: True.
        after_shard (Callable[[int], None] | None): called with each shard id once its file is in place
            (tests use it to interrupt a pass). Default: None.

    Returns:
        The manifest (``complete`` is True once every shard of every rank exists).

    Raises:
        OfflinePassMismatchError: ``out_dir`` holds a pass with another identity and ``overwrite`` is False.
        ValueError: bad arguments.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    env_rank, env_world = rank_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if not isinstance(writer, Writer):
        raise TypeError(f"{type(writer).__name__} is not an offline Writer (needs kind, identity(), records())")
    out_dir = Path(out_dir)
    device = torch.device(device)
    n = len(source)
    num_shards = (n + shard_size - 1) // shard_size
    identity = {
        "writer": writer.kind,
        "writer_settings": writer.identity(),
        "source": source.identity(),
        "shard_size": shard_size,
        "num_instances": n,
    }
    ihash = _identity_hash(identity)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        "identity_hash": ihash,
        "num_shards": num_shards,
        "complete": False,
        # where the instances were read (not part of the identity: another mount of the same file is the same)
        "source_path": str(Path(source.path).resolve()) if getattr(source, "path", None) else None,
    }
    _prepare_folder(out_dir, manifest, overwrite, rank)

    mine = list(range(rank, num_shards, world_size))
    todo = []
    for s in mine:
        for stale in out_dir.glob(_SHARD.format(s) + ".tmp-*"):
            stale.unlink(missing_ok=True)  # a crashed write of this rank's shard: never complete, never read
        path = shard_path(out_dir, s)
        if path.is_file() and (_shard_meta(path) or {}).get("identity_hash") == ihash:
            continue
        todo.append(s)
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("rank %d: %d of its %d shards already complete; resuming", rank, skipped, len(mine))

    total_inst = sum(min(shard_size, n - s * shard_size) for s in todo)
    bar = None
    if progress and rank == 0 and total_inst:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_inst, unit="inst", desc=f"{writer.kind} (rank 0/{world_size})", dynamic_ncols=True)
    t0, tokens_done = time.perf_counter(), 0
    for s in todo:
        lo, hi = s * shard_size, min((s + 1) * shard_size, n)
        parts: dict[str, list[np.ndarray]] = {}
        for b0 in range(lo, hi, batch_size):
            batch = collate(source, range(b0, min(b0 + batch_size, hi)), device)
            with torch.inference_mode():
                rec = writer.records(batch)
            if "index" in rec:
                raise ValueError(f"writer {writer.kind} returned the reserved key 'index'")
            # "_tokens" (optional, not stored): tokens the batch cost, e.g. prompt + generated for Seq-KD.
            counted = rec.pop("_tokens", None)
            for k, v in rec.items():
                parts.setdefault(k, []).append(np.asarray(v))
            tokens_done += int(np.sum(counted)) if counted is not None else batch.num_tokens
            if bar is not None:
                bar.update(len(batch.indices))
                rate = tokens_done / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        arrays = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
        arrays["index"] = np.arange(lo, hi, dtype=np.int64)
        meta = {"identity_hash": ihash, "shard": s, "start": lo, "stop": hi, "writer": writer.kind}
        _write_shard(shard_path(out_dir, s), arrays, meta)
        if after_shard is not None:
            after_shard(s)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    if todo:
        log.info(
            "rank %d wrote %d shards (%d instances, %d tokens) in %.1f s: %.0f tokens/s",
            rank,
            len(todo),
            total_inst,
            tokens_done,
            elapsed,
            tokens_done / max(elapsed, 1e-9),
        )
    if all(shard_path(out_dir, s).is_file() for s in range(num_shards)):
        manifest["complete"] = True
        _atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def iter_shards(out_dir: str | Path, require_complete: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The shards of a pass in instance order, each a dict of arrays (with ``index``).

    Raises:
        ValueError: the pass is not complete (and ``require_complete``), or a shard belongs to another pass.
    """
    from safetensors.numpy import load_file

    manifest = read_manifest(out_dir)
    if require_complete and not manifest.get("complete"):
        missing = [s for s in range(manifest["num_shards"]) if not shard_path(out_dir, s).is_file()]
        raise ValueError(
            f"the offline pass in {out_dir} is not complete ({len(missing)} of {manifest['num_shards']} shards "
            "missing); rerun the same command to finish it"
        )
    for s in range(manifest["num_shards"]):
        path = shard_path(out_dir, s)
        if not path.is_file():
            continue
        if (_shard_meta(path) or {}).get("identity_hash") != manifest["identity_hash"]:
            raise ValueError(f"{path} belongs to another pass than {out_dir / MANIFEST}; rerun with --overwrite")
        yield load_file(str(path))


def load_pass(out_dir: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """All shards of a complete pass concatenated along axis 0 (only ``keys`` when given)."""
    parts: dict[str, list[np.ndarray]] = {}
    for shard in iter_shards(out_dir):
        for k, v in shard.items():
            if keys is None or k in keys or k == "index":
                parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
