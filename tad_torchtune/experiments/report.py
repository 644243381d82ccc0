"""The report of a grid folder: CSV tables, paired confidence intervals, the paper's figures, Markdown.

``write_report(folder)`` reads every finished run (``runs/*/seed_*/result.json`` and ``evals.jsonl``) and
the teacher references, and writes into ``folder/report/``:

- ``runs.csv`` (one row per run and evaluation set, final measurements), ``summary.csv`` (per variant and
  set: mean and standard deviation over seeds), ``paired.csv`` (the grid's ``compare`` pairs: per-seed
  differences with 95 % t intervals, :mod:`tad_torchtune.experiments.stats`), ``curves.csv`` (held-out KL and
  alpha_S along training, mean and sd over seeds), ``teacher_tail.csv`` (alpha_K for K = 1..50);
- ``fig1_heldout_kl.png`` (the paper's Figure 1 with bands over seeds), ``fig2_teacher_tail.png`` (Figure 2),
  ``sweep_k.png`` / ``sweep_beta.png`` (Tables 1-2 as plots), ``eq6_alpha.png`` (alpha_S against alpha_T);
- ``report.md``: all of it as tables.
"""

from __future__ import annotations

import csv
import inspect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from tad_torchtune.experiments.grid import GridSpec, parse_grid
from tad_torchtune.experiments.runner import read_jsonl
from tad_torchtune.experiments.stats import PairedDifference, paired_difference, summarize

__all__ = ["write_report", "load_results"]

# Final measurements reported per set, and those compared pairwise.
_FINAL = ("fkl", "rkl", "ce", "ppl", "top1_agreement", "full_ece")
_PAIRED = ("fkl", "rkl", "ce", "top1_agreement", "full_ece")


def load_results(folder: Path) -> tuple[GridSpec, dict[str, dict[int, dict[str, Any]]]]:
    """The grid and its finished runs: ``{variant: {seed: result}}``, each result with its ``evals`` rows."""
    spec = parse_grid(yaml.safe_load((folder / "grid.yaml").read_text()))
    results: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in sorted((folder / "runs").glob("*/seed_*/result.json")):
        result = json.loads(path.read_text())
        result["evals"] = read_jsonl(path.parent / "evals.jsonl")
        results[result["variant"]][int(result["seed"])] = result
    return spec, results


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _loss_settings(overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(divergence class name, its arguments with TADLoss's defaults filled in) of a variant's ``kd_loss``."""
    node = overrides.get("kd_loss")
    if not isinstance(node, dict):
        return ("CE only" if "kd_loss" in overrides else "base"), {}
    name = str(node.get("_component_", "")).rsplit(".", 1)[-1]
    args = {k: v for k, v in node.items() if k != "_component_"}
    if name == "TADLoss":
        from tad_torchtune.losses.tad import TADLoss

        for pname, param in inspect.signature(TADLoss).parameters.items():
            if pname in ("top_k", "beta") and pname not in args:
                args[pname] = param.default
    return name, args


def _curve_stats(runs: dict[int, dict[str, Any]], key: str) -> list[dict[str, float]]:
    """Mean and sd over seeds of a curve measurement at each evaluation step."""
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for result in runs.values():
        for row in result["evals"]:
            if row["set"] == "curve":
                by_step[int(row["step"])].append((row["tokens"], row[key]))
    out = []
    for step in sorted(by_step):
        vals = by_step[step]
        s = summarize([v for _, v in vals])
        out.append({"step": step, "tokens": sum(t for t, _ in vals) / len(vals), "mean": s.mean, "sd": s.sd, "n": s.n})
    return out


def _paired_row(a: str, b: str, set_name: str, metric: str, d: PairedDifference) -> dict[str, Any]:
    """One row of ``paired.csv``."""
    return {"a": a, "b": b, "set": set_name, "metric": metric, "mean": d.mean, "sd": d.sd, "low": d.low,
            "high": d.high, "n": d.n, "established": d.established}  # fmt: skip


def _paired_cells(d: PairedDifference) -> str:
    """The Markdown cells ``mean | [low, high] | n | verdict`` of a paired difference."""
    verdict = "established" if d.established else "not established"
    return f"{d.mean:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | {d.n} | {verdict}"


def _fmt(summary, digits: int = 3) -> str:
    if summary.n > 1:
        return f"{summary.mean:.{digits}f} ± {summary.sd:.{digits}f}"
    return f"{summary.mean:.{digits}f}"


def _plot_curves(
    path: Path, curves: dict[str, list[dict[str, float]]], ylabel: str, title: str, hline: float | None = None
) -> None:
    from tad_torchtune.eval.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in curves.items():
        x = [p["tokens"] for p in pts]
        m = [p["mean"] for p in pts]
        sd = [0.0 if p["n"] < 2 else p["sd"] for p in pts]
        (line,) = ax.plot(x, m, marker="o", ms=3, label=name)
        ax.fill_between(x, [a - b for a, b in zip(m, sd, strict=True)], [a + b for a, b in zip(m, sd, strict=True)],
                        color=line.get_color(), alpha=0.2)  # fmt: skip
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=1, label="teacher α_T")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def write_report(folder: str | Path, to: str | Path | None = None) -> Path:
    """Writes the report of a grid folder (module docstring); returns the Markdown file's path."""
    from tad_torchtune.eval.plotting import pyplot, save_figure

    folder = Path(folder)
    out = Path(to) if to is not None else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    spec, results = load_results(folder)
    variants = [v for v in spec.variants if v.name in results]
    md: list[str] = [f"# Experiment report: `{spec.name}`", ""]
    if spec.description:
        md += [spec.description.strip(), ""]
    total = sum(len(v.seeds) for v in spec.variants)
    done = sum(len(r) for r in results.values())
    md += [
        f"Finished runs: {done} of {total}. Budget per run: {spec.steps} steps of {spec.batch_size} sequences; "
        f"held-out curve every {spec.every_steps} steps on {spec.curve_sequences} sequences; final measurements "
        "on every evaluation set in full. Values are mean ± standard deviation over seeds.",
        "",
    ]

    # --- the teacher (Figure 2) ---
    refs = {p.stem: json.loads(p.read_text()) for p in sorted((folder / "reference").glob("*.json"))}
    tail_rows = [{"set": name, "K": int(k), "alpha_k": a} for name, r in refs.items() for k, a in r["alpha_k"].items()]
    _write_csv(out / "teacher_tail.csv", tail_rows)
    md += [
        "## The teacher on the evaluation sets (Figure 2)",
        "",
        "| set | tokens | teacher ppl | arg-max ≠ next token | α_1 | α_5 | α_10 | α_20 | α_50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, r in refs.items():
        a = r["alpha_k"]
        md.append(
            f"| {name} | {r['num_tokens']} | {r['teacher_ppl']:.2f} | {r['teacher_argmax_error']:.3f} | "
            + " | ".join(f"{a[str(k)]:.3f}" for k in (1, 5, 10, 20, 50))
            + " |"
        )
        ks = sorted(int(k) for k in a)
        ax.plot(ks, [a[str(k)] for k in ks], label=f"{name} (arg-max error {r['teacher_argmax_error']:.2f})")
    ax.set_xlabel("K")
    ax.set_ylabel("teacher tail mass α_K (mean over tokens)")
    ax.set_title("Teacher tail mass beyond its top-K (paper Figure 2)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "fig2_teacher_tail.png")
    md += ["", "![teacher tail mass](fig2_teacher_tail.png)", ""]

    # --- final measurements per run and per variant ---
    run_rows, summary_rows = [], []
    sets = list(refs)
    for v in variants:
        for seed, r in sorted(results[v.name].items()):
            for set_name, metrics in r["final"].items():
                run_rows.append({"variant": v.name, "seed": seed, "student": v.student, "set": set_name,
                                 **{k: metrics[k] for k in metrics if k not in ("set", "step")},
                                 "tokens_per_second": r["tokens_per_second"]})  # fmt: skip
        for set_name in sets:
            row: dict[str, Any] = {"variant": v.name, "student": v.student, "set": set_name}
            finals = [r["final"][set_name] for r in results[v.name].values() if set_name in r["final"]]
            if not finals:
                continue
            row["n"] = len(finals)
            for key in finals[0]:
                if key in ("set", "step", "tokens", "num_tokens"):
                    continue
                s = summarize([f[key] for f in finals])
                row[f"{key}_mean"], row[f"{key}_sd"] = s.mean, s.sd
            tps = summarize([r["tokens_per_second"] for r in results[v.name].values()])
            row["tokens_per_second_mean"] = tps.mean
            summary_rows.append(row)
    _write_csv(out / "runs.csv", run_rows)
    _write_csv(out / "summary.csv", summary_rows)

    def finals_of(name: str, set_name: str, key: str) -> dict[int, float]:
        return {s: r["final"][set_name][key] for s, r in results.get(name, {}).items() if set_name in r["final"]}

    step0 = {}
    for student in spec.students:
        path = folder / "students" / student / "step0.json"
        if path.is_file():
            step0[student] = {row["set"]: row for row in json.loads(path.read_text())}
    md += ["## Final held-out measurements", ""]
    for set_name in sets:
        md += [
            f"### `{set_name}`",
            "",
            "| variant | student | seeds | forward KL | reverse KL | CE | ppl | top-1 agree | Full-ECE | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for student, rows in step0.items():
            if set_name in rows:
                r0 = rows[set_name]
                md.append(f"| (before training) | {student} | | {r0['fkl']:.3f} | {r0['rkl']:.3f} | {r0['ce']:.3f} | "
                          f"{r0['ppl']:.1f} | {r0['top1_agreement']:.3f} | {r0['full_ece']:.4f} | |")  # fmt: skip
        for v in variants:
            cells = []
            for key, digits in zip(_FINAL, (3, 3, 3, 1, 3, 4), strict=True):
                vals = list(finals_of(v.name, set_name, key).values())
                cells.append(_fmt(summarize(vals), digits) if vals else "")
            tps = summarize([r["tokens_per_second"] for r in results[v.name].values()]).mean
            md.append(f"| {v.label} | {v.student} | {len(results[v.name])} | " + " | ".join(cells) + f" | {tps:.0f} |")
        md.append("")

    # --- paired comparisons ---
    paired_rows = []
    if spec.compare:
        md += [
            "## Paired differences A − B (per seed, 95 % t interval)",
            "",
            "Negative KL / CE / ECE differences and positive top-1 differences favour A.",
            "",
            "| A − B | set | metric | mean difference | 95 % CI | seeds | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for a, b in spec.compare:
            if a not in results or b not in results:
                continue
            for set_name in sets:
                for key in _PAIRED:
                    try:
                        d = paired_difference(finals_of(a, set_name, key), finals_of(b, set_name, key))
                    except ValueError:
                        continue
                    paired_rows.append(_paired_row(a, b, set_name, key, d))
                    md.append(f"| {a} − {b} | {set_name} | {key} | {_paired_cells(d)} |")
        md.append("")
    # --- paired differences along training (the curve subset) ---
    if spec.compare:
        md += [
            "### Along training: paired forward-KL differences A − B on the held-out curve subset",
            "",
            "| A − B | step | tokens | mean difference | 95 % CI | seeds | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for a, b in spec.compare:
            if a not in results or b not in results:
                continue
            for step in sorted(
                {int(r["step"]) for res in results[a].values() for r in res["evals"] if r["set"] == "curve"}
            ):
                if step == 0:
                    continue  # every variant starts from the same student

                def at(name: str, step: int = step) -> dict[int, float]:
                    return {
                        seed: row["fkl"]
                        for seed, res in results[name].items()
                        for row in res["evals"]
                        if row["set"] == "curve" and int(row["step"]) == step
                    }

                try:
                    d = paired_difference(at(a), at(b))
                except ValueError:
                    continue
                tokens = next(
                    r["tokens"] for res in results[a].values() for r in res["evals"] if int(r["step"]) == step
                )
                paired_rows.append(_paired_row(a, b, "curve", f"fkl@step{step}", d))
                md.append(f"| {a} − {b} | {step} | {tokens:.0f} | {_paired_cells(d)} |")
        md.append("")
    _write_csv(out / "paired.csv", paired_rows)

    # --- Figure 1: held-out KL along training, per student ---
    curve_rows = []
    for student in spec.students:
        curves = {v.label: _curve_stats(results[v.name], "fkl") for v in variants if v.student == student}
        if not curves:
            continue
        for name, pts in curves.items():
            curve_rows += [{"variant": name, "metric": "fkl", **p} for p in pts]
        fname = f"fig1_heldout_kl_{student}.png"
        _plot_curves(out / fname, curves, "held-out KL(teacher ‖ student), nats/token",
                     f"Held-out forward KL during training, student {student} (mean ± sd over seeds)")  # fmt: skip
        md += [f"![held-out KL, student {student}]({fname})", ""]

    # --- Eq. 6: the student's mass on the teacher's tail ---
    k_show = 10 if 10 in spec.ks else spec.ks[-1]
    first_student = next(iter(spec.students))
    main = [v for v in variants if v.student == first_student]
    alpha_t_ref = None
    md += ["## The mechanism of Eq. 6: the student's mass on the teacher's tail", "",
           "α_T(K): the teacher's mass beyond its top-K; α_S(K): the student's mass on those same tokens "
           f"(held-out curve subset, final step; student {first_student}).", "",
           "| variant | " + " | ".join(f"α_S({k}) / α_T({k})" for k in spec.ks) + " |",
           "|---|" + "---|" * len(spec.ks)]  # fmt: skip
    for v in main:
        cells = []
        for k in spec.ks:
            ratios, a_t = [], None
            for r in results[v.name].values():
                last = [row for row in r["evals"] if row["set"] == "curve"][-1]
                ratios.append(last[f"alpha_s_{k}"] / max(last[f"alpha_t_{k}"], 1e-12))
                a_t = last[f"alpha_t_{k}"]
            cells.append(f"{_fmt(summarize(ratios), 3)}")
            if k == k_show:
                alpha_t_ref = a_t
        md.append(f"| {v.label} | " + " | ".join(cells) + " |")
    md.append("")
    alpha_curves = {v.label: _curve_stats(results[v.name], f"alpha_s_{k_show}") for v in main}
    for name, pts in alpha_curves.items():
        curve_rows += [{"variant": name, "metric": f"alpha_s_{k_show}", **p} for p in pts]
    _plot_curves(out / "eq6_alpha.png", alpha_curves, f"student mass on the teacher's tail α_S({k_show})",
                 f"Eq. 6 mechanism: α_S({k_show}) during training vs the teacher's α_T({k_show})",
                 hline=alpha_t_ref)  # fmt: skip
    md += ["![alpha_S during training](eq6_alpha.png)", ""]
    _write_csv(out / "curves.csv", curve_rows)

    # --- Tables 1-2: TAD's K and beta sweeps (first student) ---
    # Only variants that differ from the base in the loss alone (no corpus, no other override) form a sweep.
    tad = [
        (v, _loss_settings(v.overrides)[1])
        for v in main
        if _loss_settings(v.overrides)[0] == "TADLoss" and v.data is None and set(v.overrides) == {"kd_loss"}
    ]
    reference = next((v.name for v in main if _loss_settings(v.overrides)[0] == "ForwardKLLoss"), None)
    for title, key, fixed, fname in (
        ("Table 1: TAD's K (β = 2)", "top_k", ("beta", 2.0), "sweep_k.png"),
        ("Table 2: TAD's β (K = 10)", "beta", ("top_k", 10), "sweep_beta.png"),
    ):
        sweep = sorted(((args[key], v) for v, args in tad if float(args.get(fixed[0])) == fixed[1]), key=lambda x: x[0])
        if len({x for x, _ in sweep}) < 2:  # one value is no sweep
            continue
        md += [
            f"## {title}",
            "",
            f"| {key} | seeds | held-out forward KL | ppl | top-1 agree | − {reference} (95 % CI) |",
            "|---|---|---|---|---|---|",
        ]
        xs, ms, sds = [], [], []
        for x, v in sweep:
            fkl = summarize(list(finals_of(v.name, "heldout", "fkl").values()))
            ppl = summarize(list(finals_of(v.name, "heldout", "ppl").values()))
            top1 = summarize(list(finals_of(v.name, "heldout", "top1_agreement").values()))
            vs = ""
            if reference is not None:
                try:
                    d = paired_difference(finals_of(v.name, "heldout", "fkl"), finals_of(reference, "heldout", "fkl"))
                    vs = f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
                except ValueError:
                    pass
            md.append(f"| {x} | {fkl.n} | {_fmt(fkl)} | {_fmt(ppl, 1)} | {_fmt(top1)} | {vs} |")
            xs.append(float(x))
            ms.append(fkl.mean)
            sds.append(0.0 if fkl.n < 2 else fkl.sd)
        md.append("")
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label="TAD")
        if reference is not None:
            ref_fkl = summarize(list(finals_of(reference, "heldout", "fkl").values()))
            ax.axhline(ref_fkl.mean, color="k", ls="--", lw=1, label=f"{reference} (mean)")
        if key == "beta":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("final held-out forward KL")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save_figure(fig, out / fname)
        md += [f"![{title}]({fname})", ""]

    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
