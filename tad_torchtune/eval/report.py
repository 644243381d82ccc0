r"""Markdown result tables in the paper's layout (Tables 1 and 4-7): per-task scores, Avg and Rel.

.. math::
    \overline{\mathrm{Rel}} = \frac{1}{T} \sum_t 100 \log (\mathrm{Acc}_t / \mathrm{Acc}^{\mathrm{vanilla}}_t)

(the paper's symmetric relative change against vanilla KD, averaged over tasks; natural log).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

# Column headers the paper uses.
SHORT_NAMES = {
    "hellaswag": "HS",
    "winogrande": "WG",
    "openbookqa": "OBQA",
    "arc_easy": "ARC-E",
    "arc_challenge": "ARC-C",
    "piqa": "PIQA",
    "social_iqa": "SIQA",
    "storycloze_2016_tad": "Story",
    "gsm8k_cot_tad": "GSM8K",
    "minerva_math": "MATH",
    "svamp_cot_tad": "SVAMP",
    "asdiv_cot_tad": "ASDiv",
    "mawps_cot_tad": "MAWPS",
    "tabmwp_cot_tad": "TAB",
    "mathqa_cot_tad": "MQA",
    "sat_math_cot_tad": "SAT",
}
# Metrics that are accuracies in [0, 1] (enter Avg and Rel), in order of preference when a task has several.
ACCURACY_METRICS = ("acc", "exact_match", "acc_norm", "math_verify")
OTHER_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def leaf_tasks(results: Mapping, requested: Sequence[str]) -> list[str]:
    """The table's columns: requested groups expanded one level (sub-groups such as MATH stay one column)."""
    subtasks = results.get("group_subtasks", {})
    cols: list[str] = []
    for name in requested:
        for leaf in subtasks.get(name, [name]) if name in subtasks else [name]:
            if leaf not in cols:
                cols.append(leaf)
    return cols


def pick_metric(task_results: Mapping[str, object], preferred: str | None = None) -> tuple[str, float] | None:
    """``(metric, value)`` of a task's lm-eval results (keys like ``"acc,none"``); ``preferred`` wins if present."""
    names = ([preferred] if preferred else []) + list(ACCURACY_METRICS) + list(OTHER_METRICS)
    for name in names:
        for key, value in task_results.items():
            if isinstance(value, (int, float)) and key.split(",")[0] == name:  # "acc_stderr,none" never matches
                return name, float(value)
    return None


def scores(results: Mapping, columns: Sequence[str], metrics: Mapping[str, str] | None = None) -> dict[str, tuple]:
    """``{task: (metric, value)}`` for each column present in ``results["results"]``."""
    out = {}
    for task in columns:
        res = results.get("results", {}).get(task)
        if res is None:
            continue
        picked = pick_metric(res, (metrics or {}).get(task))
        if picked is not None:
            out[task] = picked
    return out


def relative_change(acc: Mapping[str, float], baseline: Mapping[str, float]) -> float | None:
    """Mean over shared tasks of ``100 * log(acc / acc_baseline)``; None when no task is shared with both > 0."""
    terms = [100.0 * math.log(acc[t] / baseline[t]) for t in acc if t in baseline and acc[t] > 0 and baseline[t] > 0]
    return sum(terms) / len(terms) if terms else None


def markdown_table(
    runs: Mapping[str, Mapping],
    requested: Sequence[str],
    *,
    baseline: str | None = None,
    metrics: Mapping[str, str] | None = None,
    extra: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """Render several runs' lm-eval results as one Markdown table in the paper's layout.

    Args:
        runs (Mapping[str, Mapping]): row name -> lm-eval results dict (as ``simple_evaluate`` returns or its JSON).
        requested (Sequence[str]): the task or group names that were evaluated (defines the columns).
        baseline (str | None): the row that Rel is computed against (e.g. vanilla KD). Default: None (no Rel)
        metrics (Mapping[str, str] | None): task -> metric to report instead of the default preference.
        extra (Mapping[str, Mapping[str, float]] | None): additional columns per row, e.g. ``{"run": {"F-ECE": 1.19}}``.

    Returns:
        str: the table; accuracies are in percent with one decimal, Avg is over accuracy columns only.
    """
    # Group membership from whichever runs carry it (a baseline JSON may hold only per-task results).
    merged = {"group_subtasks": {k: v for r in runs.values() for k, v in r.get("group_subtasks", {}).items()}}
    columns = leaf_tasks(merged, requested)
    per_run = {name: scores(res, columns, metrics) for name, res in runs.items()}
    columns = [c for c in columns if any(c in s for s in per_run.values())]
    acc_cols = [c for c in columns if any(c in s and s[c][0] in ACCURACY_METRICS for s in per_run.values())]
    extra_cols = sorted({k for v in (extra or {}).values() for k in v})
    header = ["Model"] + [SHORT_NAMES.get(c, c) for c in columns] + ["Avg"]
    if baseline is not None:
        header.append("Rel")
    header += extra_cols
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    base_acc = {c: v for c, (m, v) in per_run.get(baseline, {}).items() if m in ACCURACY_METRICS} if baseline else None
    for name, s in per_run.items():
        cells = [name]
        for c in columns:
            if c not in s:
                cells.append("–")
            elif s[c][0] in ACCURACY_METRICS:
                cells.append(f"{100 * s[c][1]:.1f}")
            else:
                cells.append(f"{s[c][1]:.3g}")
        accs = {c: s[c][1] for c in acc_cols if c in s and s[c][0] in ACCURACY_METRICS}
        cells.append(f"{100 * sum(accs.values()) / len(accs):.1f}" if accs else "–")
        if baseline is not None:
            rel = relative_change(accs, base_acc or {}) if name != baseline else None
            cells.append("–" if rel is None else f"{rel:+.1f}")
        for k in extra_cols:
            v = (extra or {}).get(name, {}).get(k)
            cells.append("–" if v is None else f"{v:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    used = {s[c][0] for s in per_run.values() for c in s}
    notes = [f"Metrics: {', '.join(sorted(used))}; accuracies in %. Avg is the mean over accuracy columns."]
    if baseline is not None:
        notes.append(f"Rel = mean over tasks of 100·log(Acc / Acc of '{baseline}').")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def load_results(path: str | Path) -> dict:
    """Read a results JSON written by the eval recipe or by ``lm_eval --output_path`` (needs a ``results`` key)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("results*.json"))
        if not found:
            raise FileNotFoundError(f"no results*.json under {path}")
        path = found[-1]
    data = json.loads(path.read_text())
    if "results" not in data:
        raise ValueError(f"{path} has no 'results' key; pass a JSON written by the eval recipe or lm_eval")
    return data
