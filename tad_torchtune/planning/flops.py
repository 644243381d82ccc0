r"""FLOPs per token of a distillation step, utilisation, a matmul peak probe, and ``tad-tune flops``.

Counting convention (the one behind the paper's "9.2 vs 9.3 PFLOPs per 1M tokens", docs/spec.md §5):
2 FLOPs per multiply-accumulate of every matmul; a backward pass costs twice its forward (gradients with
respect to inputs and to weights); the frozen teacher only runs forward; the embedding lookup is free.
Per layer and token, with model width ``D``, ``H`` query heads and ``H_kv`` key/value heads of size ``d_h``,
MLP width ``F`` and context ``S``:

- attention projections ``2·D·d_h·(2H + 2H_kv)`` (q, o and k, v);
- attention scores and mixing ``2·2·d_h·H·S_eff``, with ``S_eff = (S + 1)/2`` under the causal mask
  (``causal=False`` counts ``S``, as Megatron's formula does);
- MLP ``2·m·D·F``, ``m = 3`` for gated (SwiGLU/GeGLU: Qwen, Llama, Phi-3, Gemma-2) and 2 for Phi-2.

Plus the output projection ``2·D·V`` per model and the loss's elementwise work over the vocabulary
(``c·V``, ``c`` ≈ 15 for forward KL and ≈ 30 for TAD, an estimate: about 1e-3 of the total). The fused
TAD path (``fused=True``) projects the teacher twice when it cuts rows across slices (a first pass for w(X)):
``+2·D_T·V``; with ``fused_chunk_size`` given, sequences no longer than it go whole into slices and take one
pass (``tad_torchtune.losses.fused_linear``).

This module imports torch, our model registry and (for ``--config``) the loss planner only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tad_torchtune.recipe_settings import KNOWN_PEAKS, parse_peak_flops

__all__ = [
    "FlopsBreakdown",
    "FlopsPerToken",
    "ModelDims",
    "KNOWN_PEAKS",
    "estimate_flops_per_token",
    "model_dims",
    "forward_flops_per_token",
    "measure_matmul_peak",
    "parse_peak_flops",
    "main",
]

# Elementwise FLOPs per token per vocabulary entry of each loss (max, subtract, exp, sum, log of two
# softmaxes, the KL terms, the gradient; TAD adds the top-K, two tail log-sum-exps and the tail correction).
LOSS_FLOPS_PER_VOCAB = {"kl": 15.0, "tad": 30.0, "ce": 6.0, "none": 0.0}


@dataclass(frozen=True)
class ModelDims:
    """What the FLOP count needs from a decoder's config."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    head_dim: int
    gated_mlp: bool = True

    @property
    def non_embedding_params(self) -> int:
        """Matmul weights of the layers plus the output projection (norms and biases ignored)."""
        attn = self.embed_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.embed_dim * self.intermediate_dim
        return self.num_layers * (attn + mlp) + self.embed_dim * self.vocab_size


def model_dims(cfg: Mapping[str, Any] | str | ModelDims) -> ModelDims:
    """Dims of a model given as a named builder (``"qwen1_5_1_8b"``), a YAML ``model`` node
    (``{_component_: ..., **kwargs}``, resolved by :func:`tad_torchtune.models.registry.resolve`) or a plain
    dict of builder kwargs (``vocab_size``, ``num_layers``, ``num_heads``, ``embed_dim``, ``intermediate_dim``,
    optional ``num_kv_heads``, ``head_dim``, ``family``).

    Raises:
        ValueError: an unknown name or a dict missing a dimension (named in the message).
    """
    if isinstance(cfg, ModelDims):
        return cfg
    family = None
    if isinstance(cfg, str):
        from tad_torchtune.models.registry import NAMED

        if cfg not in NAMED:
            raise ValueError(f"unknown model name {cfg!r}; known: {', '.join(sorted(NAMED))}")
        family, kwargs = NAMED[cfg]
    elif "_component_" in cfg:
        from tad_torchtune.models.registry import resolve

        family, kwargs = resolve(cfg)
    else:
        kwargs = dict(cfg)
        family = kwargs.pop("family", None)
    need = ("vocab_size", "num_layers", "num_heads", "embed_dim", "intermediate_dim")
    missing = [k for k in need if kwargs.get(k) is None]
    if missing:
        raise ValueError(f"model config lacks {missing} (needs {list(need)}), got keys {sorted(kwargs)}")
    num_heads = int(kwargs["num_heads"])
    embed_dim = int(kwargs["embed_dim"])
    return ModelDims(
        vocab_size=int(kwargs["vocab_size"]),
        num_layers=int(kwargs["num_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(kwargs.get("num_kv_heads") or num_heads),
        embed_dim=embed_dim,
        intermediate_dim=int(kwargs["intermediate_dim"]),
        head_dim=int(kwargs.get("head_dim") or embed_dim // num_heads),
        gated_mlp=family != "phi2",
    )


def forward_flops_per_token(dims: ModelDims, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of one decoder: ``layers`` (weights), ``attention`` (scores), ``output``."""
    s_eff = (seq_len + 1) / 2 if causal else float(seq_len)
    weights = 2.0 * (dims.non_embedding_params - dims.embed_dim * dims.vocab_size)
    attention = dims.num_layers * 4.0 * dims.head_dim * dims.num_heads * s_eff
    return {"layers": weights, "attention": attention, "output": 2.0 * dims.embed_dim * dims.vocab_size}


@dataclass
class FlopsBreakdown:
    """FLOPs per token of one training step, by part. ``total`` sums them."""

    student_forward: float
    student_backward: float
    teacher_forward: float
    loss: float
    fused_recompute: float
    student_output: float  # of which: the student's output projection (forward + backward)
    teacher_output: float  # of which: the teacher's output projection (forward)

    @property
    def total(self) -> float:
        return self.student_forward + self.student_backward + self.teacher_forward + self.loss + self.fused_recompute

    def pflops_per_million_tokens(self) -> float:
        return self.total * 1e6 / 1e15

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def estimate_flops_per_token(
    student_cfg: Mapping[str, Any] | str | ModelDims,
    teacher_cfg: Mapping[str, Any] | str | ModelDims | None = None,
    seq_len: int = 2048,
    *,
    loss: str = "tad",
    fused: bool = False,
    causal: bool = True,
    fused_chunk_size: int | None = None,
) -> FlopsBreakdown:
    """FLOPs per trained token of a distillation step (student forward + backward, teacher forward, loss).

    Args:
        student_cfg, teacher_cfg: see :func:`model_dims`; no teacher gives plain LM training (``loss="ce"``).
        seq_len (int): context length (attention cost grows with it).
        loss (str): ``"tad"``, ``"kl"`` (any full-vocabulary divergence), ``"ce"`` or ``"none"``.
        fused (bool): the fused linear loss, whose first pass recomputes the teacher projection (TAD only).
        causal (bool): count the causal half of the attention scores. Default: True
        fused_chunk_size (int | None): the fused loss's slice size: ``seq_len <= fused_chunk_size`` means whole
            rows per slice and one teacher pass (no recompute). None counts the recompute. Default: None

    Returns:
        FlopsBreakdown: per-token parts; ``.total`` and ``.pflops_per_million_tokens()``.

    Example:
        >>> f = estimate_flops_per_token("qwen1_5_student_1_2b", "qwen1_5_1_8b", 2048, loss="kl")
        >>> round(f.pflops_per_million_tokens(), 1)
        9.3
    """
    if loss not in LOSS_FLOPS_PER_VOCAB:
        raise ValueError(f"loss must be one of {sorted(LOSS_FLOPS_PER_VOCAB)}, got loss={loss!r}")
    if int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got seq_len={seq_len!r}")
    s = model_dims(student_cfg)
    s_fwd = forward_flops_per_token(s, seq_len, causal)
    student_forward = sum(s_fwd.values())
    teacher_forward = teacher_output = recompute = 0.0
    if teacher_cfg is not None:
        t = model_dims(teacher_cfg)
        t_fwd = forward_flops_per_token(t, seq_len, causal)
        # The teacher's extra vocabulary rows are cut before the fused matmul; the dense path projects them.
        teacher_output = 2.0 * t.embed_dim * (s.vocab_size if fused else t.vocab_size)
        teacher_forward = t_fwd["layers"] + t_fwd["attention"] + teacher_output
        two_pass = fused and loss == "tad" and (fused_chunk_size is None or seq_len > fused_chunk_size)
        recompute = 2.0 * t.embed_dim * s.vocab_size if two_pass else 0.0
    elif loss in ("tad", "kl"):
        raise ValueError(f"loss={loss!r} needs a teacher config")
    return FlopsBreakdown(
        student_forward=student_forward,
        student_backward=2.0 * student_forward,
        teacher_forward=teacher_forward,
        loss=LOSS_FLOPS_PER_VOCAB[loss] * s.vocab_size,
        fused_recompute=recompute,
        student_output=3.0 * s_fwd["output"],
        teacher_output=teacher_output,
    )


class FlopsPerToken:
    """FLOPs per token of one fixed setup as a function of the padded sequence length, cached per length.

    The recipe builds one at setup (its student and teacher config nodes, its loss kind and path) and calls it
    with each micro-batch's padded length: a dict look-up after the first call for a length, no model walk.

    Args:
        student_cfg, teacher_cfg, loss, fused, causal, fused_chunk_size: as for :func:`estimate_flops_per_token`.

    Raises:
        ValueError: as :func:`model_dims` and :func:`estimate_flops_per_token` (checked here, once).

    Example:
        >>> fpt = FlopsPerToken("qwen1_5_student_1_2b", "qwen1_5_1_8b", loss="tad", fused=True)
        >>> fpt(2048) == estimate_flops_per_token("qwen1_5_student_1_2b", "qwen1_5_1_8b", 2048, fused=True).total
        True
    """

    def __init__(
        self,
        student_cfg: Mapping[str, Any] | str | ModelDims,
        teacher_cfg: Mapping[str, Any] | str | ModelDims | None = None,
        *,
        loss: str = "tad",
        fused: bool = False,
        causal: bool = True,
        fused_chunk_size: int | None = None,
    ) -> None:
        self.student = model_dims(student_cfg)
        self.teacher = model_dims(teacher_cfg) if teacher_cfg is not None else None
        self.loss, self.fused, self.causal, self.fused_chunk_size = loss, fused, causal, fused_chunk_size
        self._cache: dict[int, float] = {}
        self(1)  # argument errors (loss kind, a tad/kl loss without teacher) surface here, not mid-training

    def breakdown(self, seq_len: int) -> FlopsBreakdown:
        """The per-part count at ``seq_len`` (not cached)."""
        return estimate_flops_per_token(
            self.student,
            self.teacher,
            seq_len,
            loss=self.loss,
            fused=self.fused,
            causal=self.causal,
            fused_chunk_size=self.fused_chunk_size,
        )

    def __call__(self, seq_len: int) -> float:
        """Total FLOPs per token at context length ``seq_len``."""
        total = self._cache.get(seq_len)
        if total is None:
            total = self._cache[seq_len] = self.breakdown(seq_len).total
        return total


def measure_matmul_peak(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    size: int | None = None,
    iters: int | None = None,
) -> float:
    """Best-of-``iters`` FLOP/s of a square matmul: the peak the recipe reports utilisation against when
    none is configured. Defaults: CUDA bf16 8192² × 20; CPU fp32 1024² × 5 (about a second)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    size = size or (8192 if cuda else 1024)
    iters = iters or (20 if cuda else 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    best = math.inf
    for i in range(iters + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def _config_setup(path: str) -> tuple[Mapping[str, Any], Mapping[str, Any] | None, int | None, tuple]:
    """A recipe config's (student node, teacher node or None, training context, (loss, fused, chunk size)); the
    loss path is the recipe's own decision (:func:`tad_torchtune.planning.loss_plan.plan_loss`)."""
    from omegaconf import OmegaConf

    from tad_torchtune.config_loader import load_config
    from tad_torchtune.planning.loss_plan import plan_loss

    cfg = load_config(path)  # a path or a shipped config name
    if "model" not in cfg:
        raise ValueError(f"config {path} has no 'model' node")
    student = OmegaConf.to_container(cfg.model, resolve=True)
    teacher = OmegaConf.to_container(cfg.teacher_model, resolve=True) if "teacher_model" in cfg else None
    # The training context: the top-level, tokenizer's or dataset's max_seq_len, else the model's.
    nodes = [cfg, cfg.get("tokenizer") or {}, cfg.get("dataset") or {}, cfg.model]
    seq = next((n.get("max_seq_len") for n in nodes if n.get("max_seq_len")), None)
    loss = plan_loss(cfg)
    return student, teacher, int(seq) if seq else None, (loss.kind, loss.fused, loss.chunk_size)


def main(argv: list[str] | None = None) -> int:
    """``tad-tune flops``: FLOPs per token of a distillation setup and the wall time of a token budget."""
    parser = argparse.ArgumentParser(
        prog="tad-tune flops",
        description="FLOPs per token of a distillation step (student fwd+bwd, teacher fwd, loss) and the time a "
        "token budget takes at given utilisations. Models by name (tad_torchtune.models.registry.NAMED) or "
        "from a recipe config (its model and teacher_model nodes).",
    )
    parser.add_argument("--student", default="qwen1_5_student_1_2b", help="student model name (default: %(default)s)")
    parser.add_argument(
        "--teacher", default="qwen1_5_1_8b", help="teacher model name, or 'none' (default: %(default)s)"
    )
    parser.add_argument("--config", help="recipe YAML; its model/teacher_model nodes replace --student/--teacher")
    parser.add_argument("--seq-len", type=int, default=None, help="context length (default: config's, else 2048)")
    parser.add_argument(
        "--loss",
        default=None,
        choices=sorted(LOSS_FLOPS_PER_VOCAB),
        help="default: the config's kd_loss (tad for TADLoss, kl otherwise, ce when kd_weight is 0), else tad",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        default=None,
        help="the fused loss (TAD: count its teacher recompute); default: what the config's fused_loss selects",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="with --fused: the fused loss's chunk_size; sequences no longer than it take one teacher pass "
        "(default: count two)",
    )
    parser.add_argument("--non-causal", action="store_true", help="count full (non-causal) attention scores")
    parser.add_argument(
        "--tokens",
        type=float,
        default=None,
        help="token budget to project onto wall time, e.g. 2e9 (the paper's T1); none: no projection",
    )
    parser.add_argument("--hours", type=float, default=24.0, help="with --tokens: the wall-time target (default 24)")
    parser.add_argument(
        "--peak",
        default="h100-sxm",
        help=f"with --tokens: peak FLOP/s, a number, one of {sorted(KNOWN_PEAKS)}, or 'probe' to measure this "
        "machine's matmul (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    seq_len, cfg_loss = args.seq_len, ("tad", False, None)
    if args.config:
        student, teacher, cfg_seq, cfg_loss = _config_setup(args.config)
        seq_len = seq_len or cfg_seq
    else:
        student, teacher = args.student, (None if args.teacher == "none" else args.teacher)
    seq_len = seq_len or 2048
    loss = args.loss or cfg_loss[0]
    loss = loss if teacher is not None or loss in ("ce", "none") else "ce"
    if args.fused is None:
        args.fused = cfg_loss[1]
        args.chunk_size = args.chunk_size or cfg_loss[2]
    f = estimate_flops_per_token(
        student,
        teacher,
        seq_len,
        loss=loss,
        fused=args.fused,
        causal=not args.non_causal,
        fused_chunk_size=args.chunk_size,
    )
    result: dict[str, Any] = {
        "seq_len": seq_len,
        "loss": loss,
        "fused": args.fused,
        "per_token": f.as_dict(),
        "pflops_per_1m_tokens": f.pflops_per_million_tokens(),
    }
    if args.tokens is not None:
        if args.tokens <= 0 or args.hours <= 0:
            parser.error(f"--tokens and --hours must be positive, got {args.tokens:g} and {args.hours:g}")
        if args.peak == "probe":
            peak = measure_matmul_peak()
        else:
            try:  # the recipe's own reading of peak_flops: a number or a known device name
                peak = parse_peak_flops(args.peak, "--peak")
            except ValueError:
                parser.error(
                    f"--peak must be a FLOP/s value (e.g. 989e12), 'probe' or one of {sorted(KNOWN_PEAKS)}, "
                    f"got {args.peak!r}"
                )
        total = f.total * args.tokens
        seconds = args.hours * 3600.0
        result.update(
            tokens=args.tokens,
            total_flops=total,
            peak_flops=peak,
            hours=args.hours,
            mfu_for_hours=total / seconds / peak,
            tokens_per_s_for_hours=args.tokens / seconds,
            hours_at_mfu={str(m): total / (m * peak) / 3600.0 for m in (0.03, 0.1, 0.2, 0.3, 0.4, 0.5)},
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_breakdown(f, seq_len=seq_len, loss=loss, fused=args.fused))
    if args.tokens is not None:
        peak_tflops = result["peak_flops"] / 1e12
        print(f"{args.tokens:.3g} tokens: {result['total_flops']:.3e} FLOPs; peak {peak_tflops:.4g} TFLOP/s")
        print(
            f"  {args.hours:g} h needs {result['total_flops'] / seconds / 1e12:.4g} TFLOP/s = "
            f"{100 * result['mfu_for_hours']:.3g}% utilisation ({result['tokens_per_s_for_hours']:.0f} tokens/s)"
        )
        for m, hours in result["hours_at_mfu"].items():
            print(f"  at {100 * float(m):4.0f}% utilisation: {hours:.3g} h")
    return 0


def _unit(value: float) -> tuple[float, str]:
    """The scale and name that show ``value`` FLOPs with 1-3 digits before the point."""
    for scale, name in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if value >= scale:
            return scale, name
    return 1.0, "FLOP"


def format_breakdown(f: FlopsBreakdown, *, seq_len: int, loss: str, fused: bool) -> str:
    """The per-token table: the parts that add up to the total, then the output projections they include."""
    scale, unit = _unit(f.total)
    rows = [("student_forward", f.student_forward), ("student_backward", f.student_backward)]
    rows += [("teacher_forward", f.teacher_forward), ("loss", f.loss)]
    if f.fused_recompute:
        rows.append(("fused_recompute", f.fused_recompute))
    lines = [f"FLOPs per trained token (seq_len={seq_len}, loss={loss}, fused={fused}), in {unit}:"]
    lines += [f"  {name:<20} {value / scale:10.4g}" for name, value in rows]
    total = f"  {'= total':<20} {f.total / scale:10.4g}"
    lines.append(f"{total}   ({f.pflops_per_million_tokens():.4g} PFLOPs per 1M tokens)")
    lines.append("  included above, the output projections:")
    lines.append(f"  {'  student (fwd+bwd)':<20} {f.student_output / scale:10.4g}")
    lines.append(f"  {'  teacher (fwd)':<20} {f.teacher_output / scale:10.4g}")
    return "\n".join(lines)
