r"""The paper's diagnostics: held-out KL (Figure 1) and the teacher's tail mass (Figure 2).

Functions (used by the demo, from a recipe callback's ``on_step_end`` (:func:`tad_torchtune.recipes.kd_tad.run`),
and by ``tad-tune diagnose``):

- :func:`heldout_metrics`: mean per-token ``KL(p_T || p_S)``, student and teacher perplexity and top-1
  agreement on held-out batches.
- :func:`teacher_tail_stats`: the teacher's tail mass :math:`\alpha_K = 1 - \sum_{i \in S_K} p_{T,i}` for
  every K in ``ks`` (mean over tokens) and the rate at which the teacher's arg-max is not the true next token.
- :class:`HeldoutKLTracker`: run :func:`heldout_metrics` every N steps and append the result to a CSV.
- :func:`plot_heldout_kl`, :func:`plot_tail_mass`: PNG figures; ``write_*_csv`` / ``read_heldout_csv``.
- :func:`main`: the ``tad-tune diagnose`` command (``tail``, ``kl``, ``compare``, ``ece``).

Batches everywhere are dicts with ``tokens`` ``[B, S]`` and ``labels`` ``[B, S]`` already shifted
(``labels[:, t]`` is the target of position ``t``; ``-100`` is ignored), as torchtune's collators produce.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from tad_torchtune.config_loader import load_config
from tad_torchtune.eval.logit_chunks import paired_chunks, single_chunks
from tad_torchtune.reliability.errors import EXIT_REFUSED

__all__ = [
    "heldout_metrics",
    "teacher_tail_stats",
    "HeldoutKLTracker",
    "plot_heldout_kl",
    "plot_tail_mass",
    "write_heldout_csv",
    "read_heldout_csv",
    "write_tail_csv",
    "main",
]


def _forward(model: torch.nn.Module, tokens: torch.Tensor) -> object:
    device = next(model.parameters()).device
    return model(tokens.to(device))


@torch.no_grad()
def heldout_metrics(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    ignore_index: int = -100,
    max_batches: int | None = None,
    max_rows: int = 1024,
) -> dict[str, float]:
    r"""Held-out KL between teacher and student, and both perplexities (the paper's Figure 1 quantity).

    .. math::
        \mathrm{KL} = \frac{1}{N} \sum_t \sum_v p_T(v \mid x_{<t}) \log \frac{p_T(v \mid x_{<t})}{p_S(v \mid x_{<t})}

    over the N positions whose label is not ``ignore_index``, at temperature 1, in float32. A teacher
    vocabulary larger than the student's (padded rows, Phi-3's extra ids) is cut to the student's size.

    Args:
        student (torch.nn.Module): a torchtune ``TransformerDecoder``; ``student(tokens)`` returns ``[B, S, V]``
            logits or a list of ``[B, S_c, V]`` chunks.
        teacher (torch.nn.Module): the same for the teacher, ``[B, S, V_T]`` with ``V_T >= V``.
        batches (Iterable[Mapping[str, torch.Tensor]]): dicts with ``tokens`` ``[B, S]`` and shifted
            ``labels`` ``[B, S]``.
        ignore_index (int): label value that is not scored. Default: -100
        max_batches (int | None): stop after this many batches. Default: None (all)
        max_rows (int): rows (positions) processed at once, bounding the fp32 working memory. Default: 1024

    Returns:
        dict[str, float]: ``kl`` (nats per token), ``ppl`` (student), ``teacher_ppl``, ``top1_agreement``
        (fraction of positions where both arg-maxes agree), ``num_tokens``. All NaN if no token was scored.

    Raises:
        ValueError: when the teacher's vocabulary is smaller than the student's.
    """
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    kl_sum = s_nll = t_nll = agree = 0.0
    n = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            tokens, labels = batch["tokens"], batch["labels"]
            s_out, t_out = _forward(student, tokens), _forward(teacher, tokens)
            for s, t, y in paired_chunks(s_out, t_out, labels, max_rows):
                v = s.size(-1)
                if t.size(-1) < v:
                    raise ValueError(
                        f"teacher vocabulary ({t.size(-1)}) is smaller than the student's ({v}); "
                        "use a teacher whose vocabulary contains the student's"
                    )
                y = y.to(s.device)
                keep = y != ignore_index
                if not bool(keep.any()):
                    continue
                s_lp = F.log_softmax(s[keep].float(), dim=-1)  # [N, V]
                t_lp = F.log_softmax(t[keep][:, :v].to(s_lp.device).float(), dim=-1)  # [N, V], cut to V
                yk = y[keep]
                kl_sum += float((t_lp.exp() * (t_lp - s_lp)).sum())
                s_nll -= float(s_lp.gather(-1, yk[:, None]).sum())
                t_nll -= float(t_lp.gather(-1, yk[:, None]).sum())
                agree += float((s_lp.argmax(-1) == t_lp.argmax(-1)).sum())
                n += int(yk.numel())
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    if n == 0:
        nan = float("nan")
        return {"kl": nan, "ppl": nan, "teacher_ppl": nan, "top1_agreement": nan, "num_tokens": 0}
    return {
        "kl": kl_sum / n,
        "ppl": math.exp(s_nll / n),
        "teacher_ppl": math.exp(t_nll / n),
        "top1_agreement": agree / n,
        "num_tokens": n,
    }


@torch.no_grad()
def teacher_tail_stats(
    teacher: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    ks: Iterable[int] = range(1, 51),
    *,
    ignore_index: int = -100,
    max_batches: int | None = None,
    vocab_size: int | None = None,
    max_rows: int = 1024,
) -> dict[str, object]:
    r"""The teacher's tail mass :math:`\alpha_K` and arg-max error rate (the paper's Figure 2).

    For every valid position, :math:`\alpha_K = 1 - \sum_{i \in S_K} p_{T,i}`, where :math:`S_K` holds the
    teacher's K most probable tokens (docs/spec.md §1). The paper reports that the teacher's arg-max differs
    from the true next token at 39-46% of positions on Regmix validation text.

    Args:
        teacher (torch.nn.Module): the teacher; ``teacher(tokens)`` returns ``[B, S, V_T]`` logits or chunks.
        batches (Iterable[Mapping[str, torch.Tensor]]): dicts with ``tokens`` and shifted ``labels``, ``[B, S]``.
        ks (Iterable[int]): the K values. Default: 1..50
        ignore_index (int): label value that is not scored. Default: -100
        max_batches (int | None): stop after this many batches. Default: None
        vocab_size (int | None): cut the teacher's logits to this many entries first (the student's V). Default: None
        max_rows (int): positions processed at once. Default: 1024

    Returns:
        dict: ``k`` (list[int]), ``alpha_k`` (list[float], mean α_K per K), ``label_in_topk`` (list[float],
        fraction of positions whose true token is in the teacher's top K), ``argmax_error_rate`` (float),
        ``entropy`` (mean teacher entropy, nats), ``num_tokens`` (int).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    kmax = ks[-1]
    was_training = teacher.training
    teacher.eval()
    top_mass = torch.zeros(kmax, dtype=torch.float64)  # sum over tokens of the cumulative top-K mass
    hit = torch.zeros(kmax, dtype=torch.float64)  # sum over tokens of 1(label in top-K)
    wrong = ent = 0.0
    n = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            for t, y in single_chunks(_forward(teacher, batch["tokens"]), batch["labels"], max_rows):
                y = y.to(t.device)
                keep = y != ignore_index
                if not bool(keep.any()):
                    continue
                logits = t[keep].float()
                if vocab_size is not None:
                    logits = logits[:, :vocab_size]
                if logits.size(-1) < kmax:
                    raise ValueError(f"K up to {kmax} needs a vocabulary of at least {kmax}, got {logits.size(-1)}")
                lp = F.log_softmax(logits, dim=-1)  # [N, V]
                top_lp, top_idx = lp.topk(kmax, dim=-1)  # [N, kmax], sorted descending
                top_mass += top_lp.double().exp().cumsum(-1).sum(0).cpu()
                yk = y[keep]
                hit += (top_idx == yk[:, None]).double().cumsum(-1).sum(0).cpu()
                wrong += float((top_idx[:, 0] != yk).sum())
                ent -= float((lp.exp() * lp).sum())
                n += int(yk.numel())
    finally:
        teacher.train(was_training)
    denom = max(n, 1)
    alpha = (1.0 - top_mass / denom).clamp_min(0.0)
    nan = float("nan")
    return {
        "k": ks,
        "alpha_k": [float(alpha[k - 1]) if n else nan for k in ks],
        "label_in_topk": [float(hit[k - 1] / denom) if n else nan for k in ks],
        "argmax_error_rate": wrong / denom if n else nan,
        "entropy": ent / denom if n else nan,
        "num_tokens": n,
    }


class HeldoutKLTracker:
    """Run :func:`heldout_metrics` every ``every_n_steps`` steps and append rows to a CSV (from a recipe callback).

    Args:
        batches (Sequence[Mapping[str, torch.Tensor]]): the held-out batches (kept in memory; a few suffice).
        every_n_steps (int): evaluate when ``step % every_n_steps == 0``.
        csv_path (str | Path | None): where to append ``step,kl,ppl,teacher_ppl,top1_agreement,num_tokens``.
        ignore_index (int): label value that is not scored. Default: -100

    Example:
        >>> tracker = HeldoutKLTracker(heldout_batches, every_n_steps=100, csv_path="out/heldout_kl.csv")
        >>> metrics = tracker.maybe_run(step, student, teacher)  # None when not due
    """

    def __init__(
        self,
        batches: Sequence[Mapping[str, torch.Tensor]],
        every_n_steps: int,
        csv_path: str | Path | None = None,
        *,
        ignore_index: int = -100,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.batches = list(batches)
        self.every_n_steps = every_n_steps
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.ignore_index = ignore_index
        self.history: list[dict[str, float]] = []

    def maybe_run(self, step: int, student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, float] | None:
        """Evaluate at ``step`` if it is due; return the metrics (with ``step``) or None."""
        if step % self.every_n_steps:
            return None
        return self.run(step, student, teacher)

    def run(self, step: int, student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, float]:
        """Evaluate now, record and return the metrics with ``step`` added."""
        row = {"step": step, **heldout_metrics(student, teacher, self.batches, ignore_index=self.ignore_index)}
        self.history.append(row)
        if self.csv_path is not None:
            write_heldout_csv([row], self.csv_path, append=True)
        return row


# ----------------------------------------------------------------------------------------------- CSV files
_HELDOUT_FIELDS = ["step", "kl", "ppl", "teacher_ppl", "top1_agreement", "num_tokens"]


def write_heldout_csv(rows: Iterable[Mapping[str, object]], path: str | Path, *, append: bool = False) -> Path:
    """Write held-out metric rows (``step`` plus :func:`heldout_metrics` keys) as CSV; extra keys become columns."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(_HELDOUT_FIELDS)
    for r in rows:
        fields += [k for k in r if k not in fields]
    new = not (append and path.exists() and path.stat().st_size > 0)
    if not new:
        with path.open() as f:
            fields = next(csv.reader(f))
    with path.open("w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def read_heldout_csv(path: str | Path, column: str = "kl") -> list[tuple[int, float]]:
    """Read ``(step, value)`` pairs of one column from a CSV written by :func:`write_heldout_csv`."""
    with Path(path).open() as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames or column not in reader.fieldnames:
            raise ValueError(f"{path}: needs columns 'step' and {column!r}, has {reader.fieldnames}")
        return sorted((int(float(r["step"])), float(r[column])) for r in reader)


def write_tail_csv(stats: Mapping[str, object], path: str | Path) -> Path:
    """Write :func:`teacher_tail_stats` output as CSV: ``k,alpha_k,label_in_topk`` plus the scalars per row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "alpha_k", "label_in_topk", "argmax_error_rate", "entropy", "num_tokens"])
        for k, a, h in zip(stats["k"], stats["alpha_k"], stats["label_in_topk"], strict=True):
            w.writerow([k, a, h, stats["argmax_error_rate"], stats["entropy"], stats["num_tokens"]])
    return path


# ----------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> Path:
    """Lays out, writes (creating the folder) and closes a matplotlib figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_heldout_kl(
    runs: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    title: str = "Held-out KL(teacher || student)",
    *,
    ylabel: str = "held-out KL (nats/token)",
    logy: bool = False,
) -> Path:
    """Plot held-out KL against training step for several runs (e.g. TAD vs vanilla KD, the paper's Figure 1).

    Args:
        runs (Mapping[str, Sequence[tuple[int, float]]]): run name -> ``(step, kl)`` points.
        path (str | Path): the PNG to write.
        title (str): figure title.
        ylabel (str): y-axis label. Default: "held-out KL (nats/token)"
        logy (bool): log-scale y axis. Default: False

    Returns:
        Path: ``path``.
    """
    if not runs:
        raise ValueError("plot_heldout_kl needs at least one run")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=150)
    markers = "osD^v<>p*h"
    for i, (name, pts) in enumerate(runs.items()):
        pts = sorted(pts)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=3.5, linewidth=1.6, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    return _save_figure(fig, path)


def plot_tail_mass(
    stats: Mapping[str, object] | Mapping[str, Mapping[str, object]],
    path: str | Path,
    title: str = "Teacher tail mass",
) -> Path:
    r"""Plot mean :math:`\alpha_K` against K and the top-K coverage of the true token (the paper's Figure 2).

    Args:
        stats (Mapping): one :func:`teacher_tail_stats` result, or ``{teacher name: result}`` to overlay several.
        path (str | Path): the PNG to write.
        title (str): figure title.

    Returns:
        Path: ``path``.
    """
    named = {"teacher": stats} if "alpha_k" in stats else dict(stats)
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=150)
    for name, s in named.items():
        err = s["argmax_error_rate"]
        line = ax1.plot(s["k"], s["alpha_k"], marker="o", markersize=2.5, linewidth=1.6, label=name)[0]
        miss = [1.0 - h for h in s["label_in_topk"]]  # at K=1 this is the arg-max error rate
        ax2.plot(
            s["k"],
            miss,
            marker="o",
            markersize=2.5,
            linewidth=1.6,
            color=line.get_color(),
            label=f"{name}: arg-max ≠ next token {100 * err:.1f}%",
        )
    ax1.set_xlabel("K")
    ax1.set_ylabel(r"mean tail mass $\alpha_K$ (1 − teacher top-K mass)")
    ax1.set_title(title)
    ax1.set_ylim(bottom=0)
    ax1.grid(True, alpha=0.3)
    ax2.set_xlabel("K")
    ax2.set_ylabel("true next token outside teacher top-K")
    ax2.set_title("Teacher top-K miss rate")
    ax2.set_ylim(0, 1.05)
    ax2.grid(True, alpha=0.3)
    ax2.legend(frameon=False, loc="lower left", fontsize=8)
    if len(named) > 1:
        ax1.legend(frameon=False)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- CLI
def _step_of(path: str, index: int) -> int:
    """The training step a checkpoint directory stands for: its last number (``epoch_3``, ``step_1200``)."""
    nums = re.findall(r"\d+", Path(path).name)
    return int(nums[-1]) if nums else index


def _parse_runs(items: Sequence[str]) -> dict[str, str]:
    runs = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--run expects NAME=CSV_PATH, got {item!r}")
        name, p = item.split("=", 1)
        runs[name] = p
    return runs


# Longest default held-out row: long enough for the tail statistics, short enough for a CPU.
DEFAULT_MAX_SEQ_LEN = 512


def main(argv: list[str] | None = None) -> int:
    """``tad-tune diagnose``: held-out KL, teacher tail mass, run comparison and Full-ECE, as CSV and PNG."""
    p = argparse.ArgumentParser(
        prog="tad-tune diagnose",
        description=(
            "The paper's diagnostics. Models, checkpointers and the tokenizer come from a torchtune YAML with the "
            "same keys as the training recipe (model, checkpointer, teacher_model, teacher_checkpointer, tokenizer); "
            "held-out text comes from --text (.txt, .jsonl with a 'text' field, or a directory of them)."
        ),
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, text: bool = True) -> None:
        sp.add_argument("--config", required=True, help="torchtune YAML (a training config works)")
        if text:
            sp.add_argument("--text", required=True, help="held-out text: .txt, .jsonl ('text' field) or a directory")
            sp.add_argument(
                "--seq-len",
                type=int,
                default=None,
                help=f"tokens per held-out row (default: the model's max_seq_len, at most {DEFAULT_MAX_SEQ_LEN})",
            )
            sp.add_argument("--batch-size", type=int, default=4, help="rows per batch (default 4)")
            sp.add_argument("--max-batches", type=int, default=8, help="held-out batches to score (default 8)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
        sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype (default fp32)")
        sp.add_argument("--out", default="diagnostics", help="output directory (default ./diagnostics)")
        sp.add_argument("overrides", nargs="*", help="config overrides key=value, as for tune run")

    sp = sub.add_parser("tail", help="teacher tail mass α_K (K=1..50) and arg-max≠label rate (Figure 2)")
    common(sp)
    sp.add_argument("--kmax", type=int, default=50, help="largest K (default 50)")
    sp = sub.add_parser("kl", help="held-out KL(teacher||student) for each student checkpoint (Figure 1)")
    common(sp)
    sp.add_argument(
        "--checkpoints",
        nargs="+",
        required=True,
        help="student checkpoint directories (e.g. out/epoch_0 out/epoch_1); the step is the last number in the name",
    )
    sp.add_argument("--name", default="student", help="run name in the CSV/plot (default 'student')")
    sp = sub.add_parser("compare", help="plot held-out KL of several runs from their CSVs (e.g. TAD vs KD)")
    sp.add_argument("--run", action="append", required=True, help="NAME=path/to/heldout_kl.csv (repeat)")
    sp.add_argument("--column", default="kl", help="CSV column to plot (default kl)")
    sp.add_argument("--title", default="Held-out KL(teacher || student)")
    sp.add_argument("--out", default="diagnostics/heldout_kl_comparison.png", help="PNG path")
    sp = sub.add_parser("ece", help="Full-ECE (arXiv 2406.11345) of the student on held-out text")
    common(sp)
    sp.add_argument("--bins", type=int, default=10, help="number of equal-width bins (default 10)")

    args = p.parse_args(argv)
    if getattr(args, "checkpoints", None):
        # `--checkpoints a b key=value` swallows trailing overrides; give them back (a path never looks like k=v).
        moved = [c for c in args.checkpoints if "=" in c and not Path(c).exists()]
        args.checkpoints = [c for c in args.checkpoints if c not in moved]
        args.overrides = list(args.overrides) + moved
        if not args.checkpoints:
            p.error("--checkpoints needs at least one checkpoint directory")

    try:
        if args.cmd == "compare":
            runs = {name: read_heldout_csv(path, args.column) for name, path in _parse_runs(args.run).items()}
            ylabel = "held-out KL (nats/token)" if args.column == "kl" else f"held-out {args.column}"
            out = plot_heldout_kl(runs, args.out, title=args.title, ylabel=ylabel)
            print(f"wrote {out}")
            return 0
        return _run(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: one line naming it, no traceback
        print(f"tad-tune diagnose {args.cmd}: {err}", file=sys.stderr)
        return EXIT_REFUSED


def model_max_seq_len(cfg, key: str) -> int | None:
    """``max_seq_len`` of the config's ``key`` model node: stated, or its builder's (named builders included)."""
    from omegaconf import OmegaConf

    node = cfg.get(key)
    if node is None:
        return None
    node = OmegaConf.to_container(node, resolve=True)
    if node.get("max_seq_len") is not None:
        return int(node["max_seq_len"])
    try:
        from tad_torchtune.models.registry import resolve

        return int(resolve(node)[1]["max_seq_len"])
    except (ValueError, KeyError, TypeError, ImportError, AttributeError):
        return None


def _seq_len(args: argparse.Namespace, cfg) -> int:
    """``--seq-len``, else the smaller of the models' ``max_seq_len`` and :data:`DEFAULT_MAX_SEQ_LEN`."""
    keys = {"tail": ["teacher_model"], "ece": ["model"], "kl": ["teacher_model", "model"]}[args.cmd]
    limits = {k: m for k in keys if (m := model_max_seq_len(cfg, k)) is not None}
    if args.seq_len is not None:
        if args.seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
        too_long = {k: m for k, m in limits.items() if args.seq_len > m}
        if too_long:
            raise ValueError(
                f"--seq-len {args.seq_len} exceeds max_seq_len of {too_long} (the RoPE cache); "
                f"pass --seq-len {min(too_long.values())} or less"
            )
        return args.seq_len
    seq_len = min([DEFAULT_MAX_SEQ_LEN, *limits.values()])
    print(
        f"seq_len {seq_len} (models' max_seq_len {limits or 'unknown'}, at most {DEFAULT_MAX_SEQ_LEN}; "
        "--seq-len sets it)"
    )
    return seq_len


def _run(args: argparse.Namespace) -> int:
    from tad_torchtune.eval import loading

    cfg = load_config(args.config, args.overrides)
    device, dtype = loading.resolve_device_dtype(args.device, args.dtype)
    tokenizer = loading.build_tokenizer(cfg)
    seq_len = _seq_len(args, cfg)
    batches = loading.heldout_batches(tokenizer, args.text, seq_len, args.batch_size, args.max_batches)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.cmd == "tail":
        teacher = loading.build_model(cfg, "teacher_model", "teacher_checkpointer", device, dtype)
        vocab = None
        if "model" in cfg:
            vocab = loading.model_vocab_size(cfg.model)
        stats = teacher_tail_stats(teacher, batches, range(1, args.kmax + 1), vocab_size=vocab)
        csv_path = write_tail_csv(stats, out_dir / "teacher_tail_mass.csv")
        png = plot_tail_mass(stats, out_dir / "teacher_tail_mass.png")
        print(f"tokens={stats['num_tokens']} argmax_error_rate={stats['argmax_error_rate']:.4f}")
        for k in (1, 5, 10, 20, 50):
            if k <= args.kmax:
                print(f"alpha_{k} = {stats['alpha_k'][k - 1]:.4f}")
        print(f"wrote {csv_path} and {png}")
        return 0

    if args.cmd == "ece":
        from tad_torchtune.eval.full_ece import full_ece_of_model

        student = loading.build_model(cfg, "model", "checkpointer", device, dtype)
        res = full_ece_of_model(student, batches, n_bins=args.bins)
        print(f"full_ece={res['full_ece']:.6f} ece_top1={res['ece_top1']:.6f} tokens={res['num_tokens']}")
        with (out_dir / "full_ece.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["full_ece", "ece_top1", "num_tokens", "bins"])
            w.writerow([res["full_ece"], res["ece_top1"], res["num_tokens"], args.bins])
        print(f"wrote {out_dir / 'full_ece.csv'}")
        return 0

    # kl: one teacher, several student checkpoints
    teacher = loading.build_model(cfg, "teacher_model", "teacher_checkpointer", device, dtype)
    rows = []
    for i, ckpt_dir in enumerate(args.checkpoints):
        student = loading.build_model(cfg, "model", "checkpointer", device, dtype, checkpoint_dir=ckpt_dir)
        row = {"step": _step_of(ckpt_dir, i), **heldout_metrics(student, teacher, batches), "checkpoint": ckpt_dir}
        print(f"step {row['step']}: kl={row['kl']:.5f} ppl={row['ppl']:.3f} top1_agreement={row['top1_agreement']:.3f}")
        rows.append(row)
        del student
    csv_path = write_heldout_csv(rows, out_dir / f"heldout_kl_{args.name}.csv")
    png = plot_heldout_kl({args.name: [(r["step"], r["kl"]) for r in rows]}, out_dir / f"heldout_kl_{args.name}.png")
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
