"""Pre-tokenised corpora: a flat token array on disk plus a small JSON metadata file.

Layout for ``output="owm.bin"``::

    owm.bin    num_tokens ids, uint16 when the vocabulary has <= 65536 ids, else uint32, native byte order
    owm.json   {"format": "tad_torchtune.token_file", "completed": true, "dtype", "num_tokens", "num_documents",
                "vocab_size", "bos_id", "eos_id", "tokenizer": {"name", "fingerprint"}, "source": {...}, ...}

Each document is written as ``[BOS] ids [EOS]`` (BOS only when the tokenizer has one and ``add_bos``), so EOS
separates documents. While writing, the data goes to ``owm.bin.partial`` and a resume point to
``owm.progress.json`` (rewritten atomically after the data file is fsync'ed); only at the end is the partial
file renamed to ``owm.bin`` and ``owm.json`` written (``completed: true``). An interrupted run therefore never
leaves a file that :func:`open_token_file` accepts, and a rerun with the same settings continues from the
last resume point (or restarts when the settings changed).

Memory is bounded whatever the corpus size: documents are streamed (HF ``datasets`` with ``streaming=True``),
tokenised in batches by ``num_workers`` processes with at most ``2 * num_workers`` batches in flight, and
appended to the file as they come back, in order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tad_torchtune.data import tokenizer_tools as tk

log = logging.getLogger(__name__)

FORMAT = "tad_torchtune.token_file"
VERSION = 1
_EXT_TO_BUILDER = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
# Compressed text files are read through fsspec (``.zst`` needs the ``zstandard`` package).
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def data_ext(path: str | Path) -> str:
    """``a.jsonl.gz`` -> ``.jsonl``; ``a.parquet`` -> ``.parquet``."""
    p = Path(path)
    return Path(p.stem).suffix if p.suffix in _COMPRESSION else p.suffix


def meta_path(path: str | Path) -> Path:
    """``owm.bin`` -> ``owm.json``."""
    return Path(path).with_suffix(".json")


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _progress_path(path: Path) -> Path:
    return path.with_suffix(".progress.json")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class _EncodeState:
    tokenizer: Any
    bos: int | None
    eos: int
    vocab_size: int
    text_column: str


_STATE: _EncodeState | None = None


def _init_worker(state: _EncodeState) -> None:
    global _STATE
    _STATE = state
    # Rust tokenizers and torch each start thread pools; one process per core is the parallelism here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _encode_docs(texts: list[str]) -> tuple[np.ndarray, int, int]:
    """Tokenise a batch of documents into one int64 array ``[BOS] ids [EOS] [BOS] ids [EOS] ...``.

    Returns:
        (tokens, num_documents, num_utf8_bytes); empty documents are dropped.
    """
    state = _STATE
    assert state is not None, "worker not initialised"
    kept = [t for t in texts if t and not t.isspace()]
    encoded = tk.encode_batch_plain(state.tokenizer, kept)
    flat: list[int] = []
    for ids in encoded:
        if state.bos is not None:
            flat.append(state.bos)
        flat.extend(ids)
        flat.append(state.eos)
    arr = np.asarray(flat, dtype=np.int64)
    if arr.size and (arr.max() >= state.vocab_size or arr.min() < 0):
        bad = int(arr.max()) if arr.max() >= state.vocab_size else int(arr.min())
        raise ValueError(
            f"tokenizer {tk.describe(state.tokenizer)} produced id {bad} outside its vocabulary of "
            f"{state.vocab_size}; pass vocab_size= explicitly"
        )
    return arr, len(kept), sum(len(t.encode("utf-8")) for t in kept)


def resolve_files(source: str | Path | Sequence[str | Path]) -> list[str] | None:
    """Local files named by ``source`` (paths, globs, directories), or None when it is not local."""
    items = [source] if isinstance(source, str | Path) else list(source)
    files: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if data_ext(f) in _EXT_TO_BUILDER and f.is_file())
        elif p.is_file():
            files.append(str(p))
        else:
            matches = sorted(glob.glob(str(item)))
            if not matches:
                return None if len(items) == 1 and not isinstance(item, Path) else []
            files += matches
    return files


def open_source(
    source: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    subset: str | None = None,
    text_sample_by: str = "paragraph",
    streaming: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Open a corpus as an HF ``datasets`` dataset (streaming by default: bounded memory).

    Args:
        source: local file(s), glob(s) or a directory of ``.json``/``.jsonl``/``.parquet``/``.txt``/``.csv``
            files (text formats may be ``.gz``/``.bz2``/``.xz``/``.zst`` compressed), or a hub dataset id
            (``open-web-math/open-web-math``) when there is network.
        split (str): split to read. Default: ``"train"``.
        subset (str | None): hub configuration name. Default: None.
        text_sample_by (str): for ``.txt`` files, what one document is: ``"line"``, ``"paragraph"``
            (blank-line separated) or ``"document"`` (a whole file). Default: ``"paragraph"``.
        streaming (bool): stream rows instead of materialising an Arrow cache. Default: True.

    Returns:
        (dataset, description) where description is JSON-serialisable (recorded in the metadata).
    """
    from datasets import load_dataset

    files = resolve_files(source)
    if files is not None:
        if not files:
            raise FileNotFoundError(f"no data files match {source!r}")
        exts = {data_ext(f) for f in files}
        builders = {_EXT_TO_BUILDER.get(e) for e in exts}
        if None in builders or len(builders) != 1:
            raise ValueError(
                f"data files {files[:3]}... have extensions {sorted(exts)}; use one kind of "
                f"{sorted(_EXT_TO_BUILDER)} per call"
            )
        builder = builders.pop()
        empty = [f for f in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise ValueError(f"data file(s) {', '.join(files[:3])} are empty (0 bytes): there is nothing to tokenise")
        kwargs: dict[str, Any] = {"sample_by": text_sample_by} if builder == "text" else {}
        try:
            ds = load_dataset(builder, data_files=files, split=split, streaming=streaming, **kwargs)
        except StopIteration:  # datasets' json/csv builders on a file without records
            where = ", ".join(files[:3])
            raise ValueError(f"data file(s) {where} hold no records: there is nothing to tokenise") from None
        stats = [[os.path.getsize(f), int(os.path.getmtime(f))] for f in files]
        desc = {"kind": "local", "builder": builder, "files": [os.path.abspath(f) for f in files], "stat": stats}
        if builder == "text":
            desc["sample_by"] = text_sample_by
        return ds, desc
    name = str(source)
    if isinstance(source, Path) or name.startswith(("/", "./", "../", "~")) or data_ext(name) in _EXT_TO_BUILDER:
        raise FileNotFoundError(f"data file(s) {name!r} not found (a hub dataset id looks like 'owner/name')")
    ds = load_dataset(name, subset, split=split, streaming=streaming)
    return ds, {"kind": "hub", "name": name, "subset": subset, "split": split}


def _batches(ds: Any, text_column: str, batch_docs: int) -> Iterator[list[str]]:
    for batch in ds.iter(batch_size=batch_docs):
        if text_column not in batch:
            raise KeyError(f"text_column {text_column!r} not in the data; columns are {sorted(batch)}")
        yield [t if isinstance(t, str) else "" for t in batch[text_column]]


def _atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settings_diff(old: dict[str, Any], new: dict[str, Any], max_tokens: int | None) -> str:
    """``key: old -> new`` for each setting that differs between a finished file's metadata and this run."""
    was = {
        "source": old.get("source"),
        "text_column": old.get("text_column"),
        "tokenizer": (old.get("tokenizer") or {}).get("fingerprint"),
        "vocab_size": old.get("vocab_size"),
        "dtype": old.get("dtype"),
        "bos_id": old.get("bos_id"),
        "eos_id": old.get("eos_id"),
        "max_tokens": old.get("max_tokens"),
    }
    now = {**{k: new.get(k) for k in was}, "tokenizer": new.get("tokenizer_fingerprint"), "max_tokens": max_tokens}
    parts = [f"{k}: {was[k]!r} -> {now[k]!r}" for k in was if was[k] != now[k]]
    return "; ".join(parts) if parts else "metadata from another version"


def write_token_file(
    output: str | Path,
    tokenizer: Any,
    source: str | Path | Sequence[str | Path],
    *,
    text_column: str = "text",
    split: str = "train",
    subset: str | None = None,
    text_sample_by: str = "paragraph",
    max_tokens: int | float | None = None,
    num_workers: int = 2,
    batch_docs: int = 256,
    add_bos: bool = True,
    vocab_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every_s: float = 30.0,
    tokenizer_spec: Any = None,
) -> dict[str, Any]:
    """Tokenise a corpus into ``output`` (``.bin``) + metadata (``.json``); see the module docstring.

    Args:
        output (str | Path): token file to write; must end in ``.bin``.
        tokenizer: a tokenizer object (torchtune ``ModelTokenizer``, HF) or a spec for
            :func:`~tad_torchtune.data.tokenizer_tools.load_tokenizer` (HF dir, dotted name, config mapping).
        source: local files/globs/dir or a hub id, see :func:`open_source`.
        text_column (str): column holding the document text. Default: ``"text"``.
        split (str): dataset split. Default: ``"train"``.
        subset (str | None): hub configuration. Default: None.
        text_sample_by (str): document unit for ``.txt`` input. Default: ``"paragraph"``.
        max_tokens (int | float | None): stop after exactly this many tokens (the last document is cut);
            ``2e9`` gives the paper's "2B tokens". Default: None (whole corpus).
        num_workers (int): tokeniser processes; 0 or 1 tokenises in this process. Default: 2.
        batch_docs (int): documents per work item. Default: 256.
        add_bos (bool): start each document with BOS when the tokenizer has one. Default: True.
        vocab_size (int | None): override the vocabulary size read from the tokenizer. Default: None.
        overwrite (bool): replace a complete file written with other settings. Default: False.
        progress (bool): show a tqdm bar. Default: True.
        checkpoint_every_s (float): seconds between resume points (0: after every batch). Default: 30.
        tokenizer_spec: how the tokenizer was built, recorded in the metadata. Default: None.

    Returns:
        The metadata dict written to ``owm.json``.

    Raises:
        FileExistsError: a complete file with different settings exists and ``overwrite`` is False.
        ValueError: bad arguments (message names the value and the fix).
    """
    output = Path(output)
    if output.suffix != ".bin":
        raise ValueError(f"output {output} must end in .bin (the metadata goes next to it as .json)")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        max_tokens = int(max_tokens)
    if batch_docs <= 0:
        raise ValueError(f"batch_docs must be positive, got {batch_docs}")
    tok_spec = tokenizer_spec
    if isinstance(tokenizer, str | Path | dict):
        tok_spec = tokenizer if isinstance(tokenizer, dict) else str(tokenizer)
        tokenizer = tk.load_tokenizer(tokenizer)
    eos = tk.eos_id(tokenizer)
    if eos is None:
        raise ValueError(f"tokenizer {tk.describe(tokenizer)} has no eos_id; documents could not be separated")
    bos = tk.bos_id(tokenizer) if add_bos else None
    vocab = int(vocab_size) if vocab_size is not None else tk.vocab_size(tokenizer)
    dtype = dtype_for_vocab(vocab)

    ds, source_desc = open_source(source, split=split, subset=subset, text_sample_by=text_sample_by)
    settings = {
        "source": source_desc,
        "text_column": text_column,
        "tokenizer_fingerprint": tk.fingerprint(tokenizer),
        "vocab_size": vocab,
        "dtype": dtype.name,
        "bos_id": bos,
        "eos_id": eos,
    }
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    meta_file, partial, progress_file = meta_path(output), _partial_path(output), _progress_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if meta_file.exists():
        try:
            old = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            old = {}
        same = old.get("settings_hash") == settings_hash and old.get("max_tokens") == max_tokens
        if old.get("completed") and same and not overwrite and output.exists():
            log.info("%s is already complete with these settings (%d tokens); nothing to do", output, old["num_tokens"])
            return old
        if old.get("completed") and not overwrite:
            diff = _settings_diff(old, settings, max_tokens)
            raise FileExistsError(
                f"{output} is a complete token file written with other settings ({diff}); "
                "pass --overwrite (overwrite=True) to replace it, or choose another --output"
            )
        meta_file.unlink()  # metadata first: a .bin without its .json never looks complete
    if output.exists():
        output.unlink()

    # Resume point of an interrupted run with the same settings.
    rows_done = docs_done = tokens_done = bytes_done = 0
    max_id = -1
    if partial.exists() and progress_file.exists():
        try:
            prog = json.loads(progress_file.read_text())
        except json.JSONDecodeError:
            prog = {}
        fits = max_tokens is None or prog.get("num_tokens", 0) < max_tokens
        if (
            prog.get("settings_hash") == settings_hash
            and fits
            and partial.stat().st_size >= prog["num_tokens"] * dtype.itemsize
        ):
            rows_done, docs_done = prog["rows"], prog["num_documents"]
            tokens_done, bytes_done, max_id = prog["num_tokens"], prog["num_bytes"], prog["max_id"]
            log.warning("resuming %s from %d documents / %d tokens", output, docs_done, tokens_done)
        else:
            log.warning("discarding %s: it was written with other settings (or past max_tokens); restarting", partial)
    if tokens_done == 0:
        rows_done = docs_done = bytes_done = 0
        max_id = -1
    mode = "r+b" if tokens_done else "wb"
    if not partial.exists():
        mode = "wb"
    fh = open(partial, mode)
    fh.truncate(tokens_done * dtype.itemsize)
    fh.seek(tokens_done * dtype.itemsize)

    def save_progress() -> None:
        fh.flush()
        os.fsync(fh.fileno())
        _atomic_write_json(
            progress_file,
            {
                "settings_hash": settings_hash,
                "rows": rows_done,
                "num_documents": docs_done,
                "num_tokens": tokens_done,
                "num_bytes": bytes_done,
                "max_id": max_id,
            },
        )

    if rows_done:
        ds = ds.skip(rows_done)
    state = _EncodeState(tokenizer, bos, eos, vocab, text_column)
    pool = None
    if num_workers > 1:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(state,))
    else:
        _init_worker(state)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, initial=tokens_done, unit="tok", unit_scale=True, desc=f"tokenize {output.name}")
    truncated_last = False
    start = time.perf_counter()
    last_ckpt = time.monotonic()
    pending: deque[tuple[Any, int]] = deque()
    max_in_flight = 2 * max(1, num_workers)

    def consume(result: tuple[np.ndarray, int, int], nrows: int) -> bool:
        """Append one tokenised batch; True when max_tokens is reached."""
        nonlocal rows_done, docs_done, tokens_done, bytes_done, truncated_last, last_ckpt, max_id
        arr, ndocs, nbytes = result
        stop = False
        if max_tokens is not None and tokens_done + arr.size >= max_tokens:
            keep = max_tokens - tokens_done
            truncated_last = keep < arr.size and not (keep > 0 and arr[keep - 1] == eos)
            # Count the documents that have at least one token kept.
            ndocs = int(np.count_nonzero(arr[:keep] == eos)) + (1 if truncated_last else 0)
            arr = arr[:keep]
            stop = True
        fh.write(arr.astype(dtype, copy=False).tobytes())
        if arr.size:
            max_id = max(max_id, int(arr.max()))
        rows_done += nrows
        docs_done += ndocs
        tokens_done += int(arr.size)
        bytes_done += nbytes
        if bar is not None:
            bar.update(int(arr.size))
        if time.monotonic() - last_ckpt >= checkpoint_every_s and not stop:
            save_progress()
            last_ckpt = time.monotonic()
        return stop

    try:
        reached = False
        for texts in _batches(ds, text_column, batch_docs):
            if pool is None:
                if consume(_encode_docs(texts), len(texts)):
                    reached = True
                    break
                continue
            pending.append((pool.apply_async(_encode_docs, (texts,)), len(texts)))
            if len(pending) >= max_in_flight:
                res, n = pending.popleft()
                if consume(res.get(), n):
                    reached = True
                    break
        while pending and not reached:
            res, n = pending.popleft()
            reached = consume(res.get(), n)
    except BaseException:
        # Keep a consistent resume point for the rerun (the data written so far is all whole batches).
        try:
            save_progress()
        finally:
            fh.close()
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.close()
        raise
    if pool is not None:
        if reached:
            pool.terminate()  # batches still in flight are past max_tokens
        else:
            pool.close()
        pool.join()
    if bar is not None:
        bar.close()
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    elapsed = time.perf_counter() - start
    if tokens_done == 0:
        raise ValueError(f"no tokens written from {source!r}: is text_column={text_column!r} right and non-empty?")

    os.replace(partial, output)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "completed": True,
        "dtype": dtype.name,
        "num_tokens": tokens_done,
        "num_documents": docs_done,
        "num_bytes": bytes_done,
        "vocab_size": vocab,
        "max_id": max_id,
        "bos_id": bos,
        "eos_id": eos,
        "tokenizer": {
            "name": tk.describe(tokenizer),
            "spec": tok_spec,
            "fingerprint": settings["tokenizer_fingerprint"],
        },
        "source": source_desc,
        "text_column": text_column,
        "max_tokens": max_tokens,
        "truncated_last_document": truncated_last,
        "settings_hash": settings_hash,
        "seconds": round(elapsed, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _atomic_write_json(meta_file, meta)
    _fsync_dir(output.parent)
    progress_file.unlink(missing_ok=True)
    log.info("wrote %s: %d tokens, %d documents in %.1f s", output, tokens_done, docs_done, elapsed)
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """Metadata of a complete token file (``path`` may name the ``.bin`` or the ``.json``).

    Raises:
        FileNotFoundError / ValueError: missing, incomplete or inconsistent files, with what to do.
    """
    path = Path(path)
    bin_path = path.with_suffix(".bin")
    mpath = meta_path(bin_path)
    if not mpath.exists():
        hint = (
            " (an interrupted write: rerun `tad-tune tokenize` with the same arguments)"
            if (_partial_path(bin_path).exists() or bin_path.exists())
            else ""
        )
        raise FileNotFoundError(f"token file metadata {mpath} not found{hint}")
    meta = json.loads(mpath.read_text())
    if meta.get("format") != FORMAT or not meta.get("completed"):
        raise ValueError(f"{mpath} is not a completed {FORMAT} file; rerun `tad-tune tokenize`")
    if not bin_path.exists():
        raise FileNotFoundError(f"token file {bin_path} is missing (its metadata {mpath} exists)")
    expected = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    if bin_path.stat().st_size != expected:
        raise ValueError(
            f"{bin_path} has {bin_path.stat().st_size} bytes but its metadata says {meta['num_tokens']} "
            f"{meta['dtype']} tokens ({expected} bytes); the file is damaged, rerun `tad-tune tokenize --overwrite`"
        )
    return meta


def open_token_file(path: str | Path) -> tuple[np.memmap, dict[str, Any]]:
    """Memory-map a complete token file: ``(tokens [num_tokens], metadata)``. O(1): nothing is read yet."""
    meta = read_meta(path)
    tokens = np.memmap(
        Path(path).with_suffix(".bin"), dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],)
    )
    return tokens, meta
