"""Runs a grid: every (variant, seed) is the real recipe in its own folder, resumable and skippable.

Layout of a grid folder ``OUT``::

    OUT/grid.yaml                     the grid as run (a later run of another grid in OUT is refused)
    OUT/reference/                    the teacher's log-probabilities on each evaluation set (built once)
    OUT/data/NAME/                    corpus NAME of the grid's ``data`` section (MiniPLM selection, Seq-KD
                                      continuations), built before the first run that trains on it
                                      (``experiments/corpora.py``)
    OUT/students/NAME/                each student's initial weights and its step-0 measurements
    OUT/runs/VARIANT/seed_S/run.json  the run's fingerprint and recipe config
                         /train.jsonl one line of recipe metrics per optimizer step
                         /evals.jsonl held-out measurements: the curve every ``eval.every_steps`` steps, and
                                      every evaluation set in full at the last step
                         /result.json written last: the run is finished (skipped on the next invocation)

A run interrupted at any point resumes from its newest step checkpoint (written every ``every_steps``) and
drops the measurements made after it, so its files end as an uninterrupted run's would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from tqdm import tqdm

from tad_torchtune.experiments.corpora import build_corpus
from tad_torchtune.experiments.grid import GridError, GridSpec, RunSpec
from tad_torchtune.experiments.measure import evaluate_student
from tad_torchtune.experiments.setups import Setup, apply_overrides, make_setup

__all__ = ["run_grid", "RunRecorder", "read_jsonl"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a torn last line, from a kill mid-write, is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: shards of one grid prepare students and references one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RunRecorder:
    """Recipe callback of one run: per-step metrics, held-out curve, final measurements on every set.

    Args:
        run_dir (Path): the run's folder.
        spec (GridSpec): the grid.
        setup (Setup): the prepared setup (its references).
        student (str): the student's name (its step-0 measurements are shared by every run that trains it).
        advance (Callable[[int], None] | None): told how many steps were made (the resumed ones at the
            start, then one per step), for progress bars. Default: None
    """

    def __init__(
        self, run_dir: Path, spec: GridSpec, setup: Setup, student: str, advance: Callable[[int], None] | None = None
    ) -> None:
        self.run_dir, self.spec, self.setup, self.student = run_dir, spec, setup, student
        self.advance = advance or (lambda steps: None)
        self.tokens = 0.0

    def _measure(self, recipe: Any, step: int, full: bool) -> list[dict[str, Any]]:
        """The curve subset of ``heldout``; with ``full``, every set in full too (one pass over ``heldout``)."""
        common = {"n_bins": self.spec.n_bins, "ks": self.spec.ks, "batch_size": self.spec.eval_batch_size}
        curve_n = self.spec.curve_sequences
        rows = []
        for name, ref in self.setup.references.items():
            if name == "heldout":
                wanted = [curve_n, ref.eval_set.tokens.size(0)] if full else [curve_n]
                measured = evaluate_student(recipe.student, ref, wanted, **common)
                rows.append({"step": step, "tokens": self.tokens, "set": "curve", **measured[curve_n]})
                if full:
                    rows.append({"step": step, "tokens": self.tokens, "set": name, **measured[wanted[1]]})
            elif full:
                (measured,) = evaluate_student(recipe.student, ref, **common).values()
                rows.append({"step": step, "tokens": self.tokens, "set": name, **measured})
        return rows

    def on_train_start(self, recipe: Any) -> None:
        step = recipe.global_step
        train = [r for r in read_jsonl(self.run_dir / "train.jsonl") if r["step"] <= step]
        evals = [r for r in read_jsonl(self.run_dir / "evals.jsonl") if r["step"] <= step]
        self.tokens = sum(r["num_tokens"] for r in train)
        if step == 0:
            # Every run of this student starts from the same weights: measure them once, then copy.
            cache = self.setup.root / "students" / self.student / "step0.json"
            if not cache.is_file():
                cache.parent.mkdir(parents=True, exist_ok=True)
                _write_json(cache, self._measure(recipe, 0, full=True))
            evals = json.loads(cache.read_text())
        _write_jsonl(self.run_dir / "train.jsonl", train)
        _write_jsonl(self.run_dir / "evals.jsonl", evals)
        self.advance(step)

    def on_step_end(self, recipe: Any, step: int, metrics: dict[str, float]) -> None:
        self.tokens += metrics["num_tokens"]
        _append_jsonl(self.run_dir / "train.jsonl", {"step": step, **metrics})
        last = step == self.spec.steps
        if step % self.spec.every_steps == 0 or last:
            for row in self._measure(recipe, step, full=last):
                _append_jsonl(self.run_dir / "evals.jsonl", row)
        self.advance(1)


def _run_config(
    spec: GridSpec, setup: Setup, run: RunSpec, run_dir: Path, resume: bool, dataset: dict[str, Any] | None = None
):
    cfg = setup.recipe_config(run.variant.student, run_dir)
    if dataset is not None:  # the variant's corpus (data: NAME); its overrides may still change dataset.*
        OmegaConf.update(cfg, "dataset", dataset, merge=False, force_add=True)
    cfg.output_dir = str(run_dir)
    cfg.seed = run.seed
    cfg.save_every_n_steps = spec.every_steps
    cfg.keep_last_n_checkpoints = 1
    cfg.resume_from_checkpoint = resume
    cfg.progress_bar = False  # the grid's own bar covers every run
    cfg.metric_logger = {
        "_component_": "torchtune.training.metric_logging.DiskLogger",
        "log_dir": str(run_dir / "logs"),
    }
    apply_overrides(cfg, spec.base)
    apply_overrides(cfg, run.variant.overrides)
    return cfg


def _summary(run: RunSpec, run_dir: Path, fingerprint: str, wall: float) -> dict[str, Any]:
    train = read_jsonl(run_dir / "train.jsonl")
    evals = read_jsonl(run_dir / "evals.jsonl")
    seconds = [r["num_tokens"] / r["tokens_per_second_per_gpu"] for r in train if r.get("tokens_per_second_per_gpu")]
    tokens = sum(r["num_tokens"] for r in train)
    last = max(r["step"] for r in evals)
    return {
        "variant": run.variant.name,
        "label": run.variant.label,
        "seed": run.seed,
        "student": run.variant.student,
        "fingerprint": fingerprint,
        "steps": len(train),
        "train_tokens": tokens,
        "tokens_per_second": tokens / sum(seconds) if seconds else float("nan"),
        "wall_seconds_last_session": wall,
        "nonfinite_skipped_steps": train[-1].get("nonfinite_skipped_steps", 0.0) if train else 0.0,
        "final": {r["set"]: r for r in evals if r["step"] == last and r["set"] != "curve"},
        "curve": [{k: r[k] for k in ("step", "tokens", "fkl", "rkl", "ce")} for r in evals if r["set"] == "curve"],
    }


def _check_grid_folder(spec: GridSpec, out_dir: Path) -> None:
    """A grid folder belongs to one grid: refuse another grid's name (the runs would mix)."""
    stored = out_dir / "grid.yaml"
    if stored.is_file():
        old = yaml.safe_load(stored.read_text()) or {}
        if old.get("name") != spec.name:
            raise GridError(
                f"grid: {out_dir} holds grid {old.get('name')!r}, not {spec.name!r}; choose another --out folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    stored.write_text(yaml.safe_dump(spec.source, sort_keys=False))


def run_grid(
    spec: GridSpec,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    only: set[str] | None = None,
    max_runs: int | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Runs the grid's unfinished runs (this shard's: every ``n``-th from ``i`` of :meth:`GridSpec.runs`).

    Args:
        spec (GridSpec): the grid.
        out_dir (str | Path): the grid folder (module docstring).
        shard (tuple[int, int]): ``(i, n)``: run ``runs[i::n]``; shards can run at once in one folder.
        only (set[str] | None): run only these variants. Default: None (all)
        max_runs (int | None): stop after starting this many runs. Default: None
        keep_checkpoints (bool): keep each finished run's checkpoints and final weights. Default: False
        progress (bool): one progress bar over the steps of every run. Default: True

    Returns:
        list[dict]: the ``result.json`` of every run of this shard that is finished now.

    Raises:
        GridError: a run folder made with other settings, or another grid's folder.
    """
    from tad_torchtune.recipes.kd_tad import run as run_recipe

    out_dir = Path(out_dir)
    _check_grid_folder(spec, out_dir)
    i, n = shard
    runs = [r for r in spec.runs()[i::n] if only is None or r.variant.name in only]
    pending: list[tuple[RunSpec, Path, str]] = []
    for run in runs:
        run_dir, fingerprint = out_dir / "runs" / run.key, spec.fingerprint(run)
        meta = run_dir / "run.json"
        if meta.is_file() and json.loads(meta.read_text())["fingerprint"] != fingerprint:
            raise GridError(
                f"grid: {run_dir} was run with other settings than variant {run.variant.name!r} has now; "
                f"delete that folder to rerun it, or run the changed grid in a new --out folder"
            )
        if not (run_dir / "result.json").is_file():
            pending.append((run, run_dir, fingerprint))
    if max_runs is not None:
        pending = pending[:max_runs]
    if spec.setup.get("threads"):
        torch.set_num_threads(int(spec.setup["threads"]))
    setup = make_setup(spec, out_dir)
    with _locked(out_dir / ".prepare.lock"):
        setup.prepare()

    done_steps = (len(runs) - len(pending)) * spec.steps
    bar = tqdm(total=len(runs) * spec.steps, initial=done_steps, unit="step", disable=not progress, dynamic_ncols=True)
    # The recipe's INFO lines, per run, would bury the bar (a filter: lazily imported modules reset levels).
    quiet = logging.getLogger("torchtune.utils._logging")
    warnings_only = logging.Filter()
    warnings_only.filter = lambda record: record.levelno >= logging.WARNING
    quiet.addFilter(warnings_only)
    try:
        for k, (run, run_dir, fingerprint) in enumerate(pending, start=1):
            bar.set_description(f"{run.key} ({k}/{len(pending)} to run)")
            run_dir.mkdir(parents=True, exist_ok=True)
            resume = any((run_dir / "checkpoints").glob("step_*"))
            dataset = None
            if run.variant.data is not None:
                with _locked(out_dir / "data" / f".{run.variant.data}.lock"):
                    dataset = build_corpus(setup, run.variant.data, progress=progress)["dataset"]
            cfg = _run_config(spec, setup, run, run_dir, resume, dataset)
            _write_json(
                run_dir / "run.json",
                {"fingerprint": fingerprint, "variant": run.variant.name, "seed": run.seed,
                 "config": OmegaConf.to_container(cfg, resolve=True)},
            )  # fmt: skip
            recorder = RunRecorder(run_dir, spec, setup, run.variant.student, advance=bar.update)
            t0 = time.perf_counter()
            run_recipe(cfg, callbacks=[recorder])
            _write_json(run_dir / "result.json", _summary(run, run_dir, fingerprint, time.perf_counter() - t0))
            if not keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                for folder in run_dir.glob("epoch_*"):
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        quiet.removeFilter(warnings_only)
        bar.close()
    return [
        json.loads((out_dir / "runs" / r.key / "result.json").read_text())
        for r in runs
        if (out_dir / "runs" / r.key / "result.json").is_file()
    ]
