"""Training corpora made by an offline step, for grid variants (the grid's ``data`` section).

A variant with ``data: NAME`` trains on corpus ``NAME`` instead of the setup's training text. The runner builds
each corpus once per grid folder, before the first run that needs it, under a lock (shards of one grid share
it), and keeps it under ``OUT/data/NAME/``::

    OUT/data/NAME/spec.json        the corpus's settings (a folder made with other settings is refused)
    OUT/data/NAME/pool.bin/.json   the windows the offline step reads: a seeded sample of ``windows`` of the
                                   setup's training windows, in corpus order, as a token file
    OUT/data/NAME/scores/          miniplm: the teacher/reference scoring pass (``tad-tune offline score``)
    OUT/data/NAME/selected.bin     miniplm: the kept windows (``tad-tune offline select``), read by
                                   ``packed_token_dataset`` with the setup's ``seq_len``
    OUT/data/NAME/seqkd/           seqkd: the teacher's greedy continuations of the pool windows' first
                                   ``prefix_len`` tokens (``tad-tune offline generate``), read by ``seqkd_dataset``
    OUT/data/NAME/prompts/         prompts: the pool windows split into their first ``prefix_len`` tokens (the
                                   prompt) and the next ``response_len`` (the original text's response), in the
                                   Seq-KD folder format and read by ``seqkd_dataset``: prompt-masked items for
                                   on-policy distillation (no model runs)
    OUT/data/NAME/corpus.json      written last: the recipe's dataset node and the step's cost (teacher
                                   passes, tokens, wall seconds, bytes on disk)

The scoring, generation and split passes are :func:`tad_torchtune.offline.run_pass` passes: an interrupted
build resumes from its last complete shard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tad_torchtune.experiments.grid import GridError

__all__ = ["build_corpus", "corpus_dir", "write_windows"]

log = logging.getLogger(__name__)
_SHARD_SIZE = 16  # windows per pass shard: small, so an interrupted demo-scale pass loses little


def corpus_dir(root: str | Path, name: str) -> Path:
    """The folder of corpus ``name`` in grid folder ``root``."""
    return Path(root) / "data" / name


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _bytes(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            total += p.stat().st_size
    return total


def write_windows(windows: torch.Tensor, path: Path, tokenizer: Any, source: dict[str, Any]) -> dict[str, Any]:
    """Write ``[N, L + 1]`` windows as a token file whose ``max_seq_len = L`` windows are these windows.

    The file holds each window's first ``L`` ids, then the last window's final id (the layout of
    :func:`tad_torchtune.offline.miniplm.write_selected_token_file`): window ``i`` of the file is window ``i``
    here, except that its last label is window ``i + 1``'s first id (the windows need not be adjacent).

    Args:
        windows (torch.Tensor): int64 ``[N, L + 1]``.
        path (Path): the ``.bin`` file (its metadata goes to ``.json`` beside it, written last).
        tokenizer: the tokenizer the ids come from (its fingerprint goes into the metadata).
        source (dict): where the windows come from (recorded in the metadata).
    """
    from tad_torchtune.data import tokenizer_tools as tk
    from tad_torchtune.data.token_file import FORMAT, VERSION, dtype_for_vocab, meta_path

    vocab = tk.vocab_size(tokenizer)
    flat = torch.cat([windows[:, :-1].reshape(-1), windows[-1, -1:]]).numpy()
    dtype = dtype_for_vocab(vocab)
    meta_path(path).unlink(missing_ok=True)  # metadata last: a .bin without its .json never looks complete
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(flat.astype(dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    eos = tk.eos_id(tokenizer)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "completed": True,
        "dtype": np.dtype(dtype).name,
        "num_tokens": int(flat.size),
        "num_documents": int(np.count_nonzero(flat == eos)) if eos is not None else 0,
        "vocab_size": vocab,
        "max_id": int(flat.max()),
        "bos_id": tk.bos_id(tokenizer),
        "eos_id": eos,
        "tokenizer": {"name": tk.describe(tokenizer), "spec": None, "fingerprint": tk.fingerprint(tokenizer)},
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(meta_path(path), meta)
    return meta


def _loaded(model: torch.nn.Module, what: str, dtype: str) -> Any:
    from tad_torchtune.offline.engine import model_fingerprint
    from tad_torchtune.offline.models import LoadedModel

    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    return LoadedModel(model, model_fingerprint(model), {"component": what, "checkpoint_dir": None, "dtype": dtype})


def _pool(setup: Any, name: str, spec: dict[str, Any], folder: Path) -> tuple[Path, Any]:
    """The sampled windows as ``pool.bin`` (rewritten each time: cheap, and identical for the same settings)."""
    windows, tokenizer = setup.training_windows()
    n = spec["windows"]
    if n > windows.size(0):
        raise GridError(
            f"grid: data.{name}.windows: {n} > the {windows.size(0)} training windows of {setup.seq_len} tokens "
            "the setup has; ask for fewer"
        )
    g = torch.Generator().manual_seed(spec["sample_seed"])
    picked = torch.randperm(windows.size(0), generator=g)[:n].sort().values
    pool = folder / "pool.bin"
    source = {
        "kind": "grid_training_windows_sample",
        "windows_total": int(windows.size(0)),
        "windows": n,
        "sample_seed": spec["sample_seed"],
        "seq_len": setup.seq_len,
    }
    write_windows(windows[picked], pool, tokenizer, source)
    return pool, tokenizer


def _miniplm(setup: Any, spec: dict[str, Any], folder: Path, pool: Path, progress: bool) -> dict[str, Any]:
    from tad_torchtune.offline.engine import WindowSource, run_pass
    from tad_torchtune.offline.miniplm import DifferenceScoreWriter, write_selected_token_file

    t0 = time.perf_counter()
    teacher, _ = setup.load_teacher()
    reference = setup.load_reference(spec["reference_layers"])
    writer = DifferenceScoreWriter(
        _loaded(teacher, "teacher", spec["dtype"]),
        _loaded(reference, f"reference (layers {spec['reference_layers']})", spec["dtype"]),
    )
    source = WindowSource(pool, max_seq_len=setup.seq_len)
    run_pass(
        source, writer, folder / "scores", shard_size=_SHARD_SIZE, batch_size=spec["batch_size"], progress=progress
    )
    del teacher, reference, writer
    t1 = time.perf_counter()
    selected = folder / "selected.bin"
    meta = write_selected_token_file(folder / "scores", selected, fraction=spec["fraction"], overwrite=True)
    t2 = time.perf_counter()
    scored = len(source) * setup.seq_len
    return {
        "dataset": {
            "_component_": "tad_torchtune.data.packed_token_dataset",
            "path": str(selected),
            "max_seq_len": setup.seq_len,
        },
        "cost": {
            "teacher_passes": "one forward of the teacher and one of the reference per scored window",
            "windows_scored": len(source),
            "windows_kept": meta["source"]["num_windows_kept"],
            "tokens_scored": scored,
            "tokens_kept": meta["source"]["num_windows_kept"] * setup.seq_len,
            "teacher_forward_tokens": scored,
            "reference_forward_tokens": scored,
            "score_seconds": round(t1 - t0, 1),
            "select_seconds": round(t2 - t1, 2),
            "scores_bytes": _bytes(folder / "scores"),
            "selected_bytes": _bytes(selected, selected.with_suffix(".json")),
        },
    }


def _prompt_response_pass(
    setup: Any,
    writer: Any,
    out: Path,
    pool: Path,
    *,
    cut: int | None,
    item_len: int,
    train_on_prompt: bool,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, Any], int, dict[str, np.ndarray]]:
    """A Seq-KD-format pass over the pool windows and the recipe's dataset node that reads it.

    Args:
        cut (int | None): the instances are the windows' first ``cut`` ids (Seq-KD's prompts); None: whole windows.
        item_len (int): prompt + response tokens, the dataset's ``max_seq_len``.

    Returns:
        (the dataset node, the number of items, the pass's ``lengths`` and ``stopped``).
    """
    from tad_torchtune.offline.engine import WindowSource, load_pass, run_pass

    source = WindowSource(pool, max_seq_len=setup.seq_len, prefix_len=cut)
    run_pass(source, writer, out, shard_size=_SHARD_SIZE, batch_size=batch_size, progress=progress)
    dataset = {
        "_component_": "tad_torchtune.offline.seqkd_dataset",
        "path": str(out),
        "max_seq_len": item_len,
        "train_on_prompt": train_on_prompt,
    }
    return dataset, len(source), load_pass(out, keys=["lengths", "stopped"])


def _seqkd(setup: Any, spec: dict[str, Any], folder: Path, pool: Path, tokenizer: Any, progress: bool) -> dict:
    from tad_torchtune.data import tokenizer_tools as tk
    from tad_torchtune.offline.seqkd import SeqKDWriter, stop_ids_of

    t0 = time.perf_counter()
    teacher, _ = setup.load_teacher()
    writer = SeqKDWriter(
        _loaded(teacher, "teacher", spec["dtype"]),
        max_new_tokens=spec["max_new_tokens"],
        stop_ids=stop_ids_of(tokenizer),
        temperature=0.0,  # greedy: Kim & Rush's beam-1 approximation of the teacher's mode
        vocab_size=tk.vocab_size(tokenizer),
        end_id=tk.eos_id(tokenizer),
    )
    out = folder / "seqkd"
    dataset, n, data = _prompt_response_pass(
        setup,
        writer,
        out,
        pool,
        cut=spec["prefix_len"],
        item_len=spec["prefix_len"] + spec["max_new_tokens"],
        train_on_prompt=spec["train_on_prompt"],
        batch_size=spec["batch_size"],
        progress=progress,
    )
    del teacher, writer
    seconds = time.perf_counter() - t0
    return {
        "dataset": dataset,
        "cost": {
            "teacher_passes": "one greedy decode (KV cache) per prompt: max_new_tokens sequential steps per batch",
            "prompts": n,
            "prompt_tokens": n * spec["prefix_len"],
            "generated_tokens": int(data["lengths"].sum()),
            "stopped_early": int(data["stopped"].sum()),
            "generate_seconds": round(seconds, 1),
            "seqkd_bytes": _bytes(out),
        },
    }


def _prompts(setup: Any, spec: dict[str, Any], folder: Path, pool: Path, progress: bool) -> dict:
    """Each pool window split into its first ``prefix_len`` ids and the next ``response_len`` (the original text).

    Only ids ``[0, seq_len)`` of a pool window are the original window's (its last label is the next pool
    window's first id, :func:`write_windows`); the grid checks ``prefix_len + response_len <= seq_len``.
    """
    from tad_torchtune.offline.seqkd import ReferenceSplitWriter

    t0 = time.perf_counter()
    writer = ReferenceSplitWriter(prefix_len=spec["prefix_len"], response_len=spec["response_len"])
    out = folder / "prompts"
    dataset, n, data = _prompt_response_pass(
        setup,
        writer,
        out,
        pool,
        cut=None,
        item_len=spec["prefix_len"] + spec["response_len"],
        train_on_prompt=False,  # the prompt mask on-policy distillation reads (docs/on_policy.md)
        batch_size=64,
        progress=progress,
    )
    return {
        "dataset": dataset,
        "cost": {
            "teacher_passes": "none: the response is the original text after the prompt",
            "prompts": n,
            "prompt_tokens": n * spec["prefix_len"],
            "response_tokens": int(data["lengths"].sum()),
            "split_seconds": round(time.perf_counter() - t0, 2),
            "prompts_bytes": _bytes(out),
        },
    }


def build_corpus(setup: Any, name: str, progress: bool = False) -> dict[str, Any]:
    """Corpus ``name`` of ``setup.spec.data``: built on the first call, read back on later ones.

    Args:
        setup: the grid's prepared :class:`~tad_torchtune.experiments.setups.Setup`.
        name (str): a corpus of the grid's ``data`` section.
        progress (bool): the offline pass's progress bar. Default: False.

    Returns:
        The corpus record: ``spec``, ``dataset`` (the recipe's dataset node) and ``cost``.

    Raises:
        GridError: the folder holds a corpus made with other settings, or the setup has too few windows.
    """
    spec = setup.spec.data[name]
    folder = corpus_dir(setup.root, name)
    record_path, spec_path = folder / "corpus.json", folder / "spec.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) != spec:
        raise GridError(
            f"grid: {folder} was built with other settings than data.{name} has now; delete that folder to "
            "rebuild it, or run the changed grid in a new --out folder"
        )
    if record_path.is_file():
        return json.loads(record_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(spec_path, spec)
    t0 = time.perf_counter()
    pool, tokenizer = _pool(setup, name, spec, folder)
    log.info("data.%s: building the %s corpus from %d windows in %s", name, spec["kind"], spec["windows"], folder)
    if spec["kind"] == "miniplm":
        built = _miniplm(setup, spec, folder, pool, progress)
    elif spec["kind"] == "seqkd":
        built = _seqkd(setup, spec, folder, pool, tokenizer, progress)
    else:
        built = _prompts(setup, spec, folder, pool, progress)
    built["cost"]["wall_seconds"] = round(time.perf_counter() - t0, 1)  # this session's (a resume skips shards)
    built["cost"]["pool_bytes"] = _bytes(pool, pool.with_suffix(".json"))
    record = {"name": name, "spec": spec, **built}
    _write_json(record_path, record)
    return record
