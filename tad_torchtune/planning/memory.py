"""Per-GPU memory estimate for a ``knowledge_distillation_tad`` config, before spending any compute.

``estimate_memory(cfg, gpus)`` adds up, per GPU (FSDP2 full sharding when ``gpus > 1``):

=====================  ===========================================================================
part                   bytes
=====================  ===========================================================================
student weights        ``P_S * w / N``                  (``w`` = 2 for bf16, 4 for fp32)
student grads          ``P_train * w / N``              (frozen parameters, e.g. embeddings, have none)
optimizer states       ``2 * P_train * s / N``          (AdamW: ``s = w``; 8-bit AdamW: ``s = 1``)
teacher weights        ``P_T * w / N``
FSDP gather buffers    ``2 * (largest layer of S + of T) * w``  (only when ``N > 1``: one layer gathered,
                       one prefetched)
activations            with checkpointing: the input of every student layer ``L_S * T * D * w`` plus one
                       layer recomputed in backward; without: every layer's saved tensors.
                       One layer saves about ``T * w * (12 D + c_I I)`` (``c_I`` = 4 gated MLP, 2 GELU)
                       plus ``B * H * S^2 * 10`` bytes where attention is eager (Gemma-2's soft-capped
                       attention: scores, capped scores, fp32 softmax kept for backward)
teacher activations    one layer at a time under ``no_grad``: ``T * w * (12 D + c_I I)`` (+ eager scores)
logits                 (chunked-logits path) student logits and their gradient ``2 * T * V_S * w``, teacher
                       logits ``T * V_T * w``, and the loss's fp32 working set for one chunk ``4 * (T / C) * V * 4``
fused loss             (fused path, the default where it applies: ``training/loss_path.py``) no logits: the
                       teacher's final hidden states ``T * D_T * w``, the student's hidden-state gradient
                       ``T * D_S * w``, one slice's buffers ``c * V * (4 * 4 + 2 * w)`` (``c`` =
                       ``fused_chunk_size`` tokens; four fp32 ``[c, V]`` buffers, two model-dtype ones when
                       ``w < 4``) and the fp32 output-weight gradient ``V * D_S * 4``
overhead               1.5 GiB (CUDA context, NCCL) + 10% of the above (allocator fragmentation)
=====================  ===========================================================================

with ``T = batch_size * max_seq_len`` tokens per micro-batch per GPU and ``C`` the loss's
``num_output_chunks``. Which loss path a config takes is decided as the recipe decides it (same function),
and the plan's notes say which and why. It is an estimate: ``tests/planning/test_memory.py`` checks it against the
measured peak of a CPU training step (within a factor stated there).

CLI: ``tad-tune plan --config configs/gemma2_9b_to_2b.yaml --gpus 2``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from tad_torchtune.models.registry import resolve
from tad_torchtune.planning.loss_plan import loads_teacher, plan_loss

__all__ = ["MemoryPlan", "estimate_memory", "model_numbers", "main"]

GIB = 1024**3


@dataclass
class MemoryPlan:
    """Per-GPU bytes by part, and whether they fit."""

    gpus: int
    parts: dict[str, float] = field(default_factory=dict)
    capacity_gib: float = 80.0
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib

    def table(self) -> str:
        """Human-readable breakdown."""
        lines = [f"per-GPU memory estimate ({self.gpus} GPU{'s' if self.gpus > 1 else ''}):"]
        for k, v in self.parts.items():
            lines.append(f"  {k:<24} {v / GIB:8.2f} GiB")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'total':<24} {self.total_gib:8.2f} GiB  -> {verdict} in {self.capacity_gib:g} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def model_numbers(model_node: dict[str, Any], freeze: list[str] | None = None) -> dict[str, Any]:
    """Parameter counts (total, trainable, largest layer) and dims of a YAML model node, on the meta device."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    family, args = resolve(model_node)
    with torch.device("meta"):
        model = tt_config.instantiate(OmegaConf.create(model_node))
    pats = [re.compile(p) for p in (freeze or [])]
    total = trainable = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if not any(r.search(name) for r in pats):
            trainable += p.numel()
    layer = max(sum(p.numel() for p in lyr.parameters()) for lyr in model.layers)
    attn = model.layers[0].attn
    eager = family == "gemma2" and getattr(attn, "attn_impl", "eager") == "eager"
    return dict(
        model=model,
        family=family,
        total=total,
        trainable=trainable,
        layer=layer,
        num_layers=len(model.layers),
        dim=args["embed_dim"],
        inter=model.layers[0].mlp.w1.weight.shape[0],
        heads=attn.num_heads,
        vocab=model.tok_embeddings.weight.shape[0],
        gated=getattr(model.layers[0].mlp, "w3", None) is not None,
        eager_attention=eager,
    )


def _seq_len(cfg) -> int:
    for node in ("dataset", "tokenizer"):
        sub = cfg.get(node)
        if sub is not None and sub.get("max_seq_len") is not None:
            return int(sub.get("max_seq_len"))
    if cfg.get("max_seq_len") is not None:
        return int(cfg.max_seq_len)
    raise ValueError("cannot find the sequence length: set dataset.max_seq_len or tokenizer.max_seq_len")


def estimate_memory(cfg: Any, gpus: int = 1, *, capacity_gib: float = 80.0, seq_len: int | None = None) -> MemoryPlan:
    """Estimate per-GPU memory of a TAD distillation config.

    Args:
        cfg (Any): the experiment config (``DictConfig`` or dict) with ``model``, ``teacher_model``, ``dtype``,
            ``batch_size``, ``enable_activation_checkpointing``, ``optimizer``, ``kd_loss``, ``freeze``.
        gpus (int): number of GPUs (FSDP2 full sharding across them). Default: 1
        capacity_gib (float): memory per GPU. Default: 80.0 (H100 80GB)
        seq_len (int | None): tokens per sequence; None reads ``dataset.max_seq_len`` / ``tokenizer.max_seq_len``.

    Returns:
        MemoryPlan: parts in bytes, ``total_gib`` and ``fits``.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    w = {"bf16": 2, "fp16": 2, "fp32": 4}[str(cfg.get("dtype", "bf16"))]
    n = gpus
    b = int(cfg.batch_size)
    s = seq_len or _seq_len(cfg)
    t = b * s
    freeze = list(cfg.get("freeze", None) or [])
    stu = model_numbers(OmegaConf.to_container(cfg.model, resolve=True), freeze)
    loaded = loads_teacher(cfg) and "teacher_model" in cfg
    tea = model_numbers(OmegaConf.to_container(cfg.teacher_model, resolve=True)) if loaded else None
    opt = str(OmegaConf.select(cfg, "optimizer._component_", default="torch.optim.AdamW"))
    state_bytes = 1 if "8bit" in opt.lower() else w
    chunks = int(OmegaConf.select(cfg, "kd_loss.num_output_chunks", default=8) or 8)
    ac = bool(cfg.get("enable_activation_checkpointing", False))

    def layer_act(m: dict[str, Any]) -> float:
        per = t * w * (12 * m["dim"] + (4 if m["gated"] else 2) * m["inter"])
        if m["eager_attention"]:
            per += b * m["heads"] * s * s * 10
        return per

    plan = MemoryPlan(gpus=n, capacity_gib=capacity_gib)
    p = plan.parts
    p["student weights"] = stu["total"] * w / n
    p["student grads"] = stu["trainable"] * w / n
    p["optimizer states"] = 2 * stu["trainable"] * state_bytes / n
    if tea is not None:
        p["teacher weights"] = tea["total"] * w / n
    if n > 1:
        p["FSDP gather buffers"] = 2 * (stu["layer"] + (tea["layer"] if tea else 0)) * w
    if ac:
        p["student activations"] = stu["num_layers"] * t * stu["dim"] * w + layer_act(stu)
    else:
        p["student activations"] = stu["num_layers"] * layer_act(stu)
    if tea is not None:
        p["teacher activations"] = layer_act(tea)
    loss = plan_loss(cfg, stu["model"], tea["model"] if tea else None, gpus=n)
    if loss.fused:
        slice_tokens = min(int(loss.chunk_size), t)
        v = stu["vocab"]
        slice_bytes = slice_tokens * v * (4 * 4 + (2 * w if w < 4 else 0))
        p["fused loss"] = t * tea["dim"] * w + t * stu["dim"] * w + slice_bytes + v * stu["dim"] * 4
        path_note = f"loss path: fused ({slice_tokens} tokens per slice, no [B, S, V] logits)"
    else:
        v_t = tea["vocab"] if tea else 0
        p["logits"] = 2 * t * stu["vocab"] * w + t * v_t * w + 4 * (t / chunks) * max(stu["vocab"], v_t) * 4
        path_note = f"loss path: chunked logits ({loss.why_not_fused})"
    body = sum(p.values())
    p["overhead"] = 1.5 * GIB + 0.10 * body
    plan.notes.append(
        f"student {stu['total'] / 1e9:.3f}B params ({stu['trainable'] / 1e9:.3f}B trainable), "
        + (f"teacher {tea['total'] / 1e9:.3f}B, " if tea else "no teacher, ")
        + f"{b} x {s} tokens per micro-batch, dtype {cfg.get('dtype', 'bf16')}, activation checkpointing {ac}"
    )
    plan.notes.append(path_note)
    if stu["eager_attention"] or (tea and tea["eager_attention"]):
        plan.notes.append("Gemma-2 eager attention: O(S^2) scores per layer (attn_impl=flex avoids it on GPU)")
    return plan


def main(argv: list[str] | None = None) -> int:
    """``tad-tune plan --config X --gpus N``: print the per-GPU memory estimate; exit 1 if it does not fit."""
    parser = argparse.ArgumentParser(
        prog="tad-tune plan",
        description="Estimate per-GPU memory of a distillation config (weights, grads, optimizer, teacher, "
        "activations, logit chunks) and say whether it fits.",
    )
    parser.add_argument("--config", required=True, help="a config file or a shipped config name (tad-tune ls)")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (FSDP2 sharding). Default: 1")
    parser.add_argument("--capacity-gib", type=float, default=80.0, help="memory per GPU. Default: 80")
    parser.add_argument("--seq-len", type=int, default=None, help="override the sequence length")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. batch_size=8)")
    ns = parser.parse_args(argv)

    from tad_torchtune.config_loader import load_config

    try:  # a shipped name or a path, key=value overrides checked: the same loader as validate and the recipe
        cfg = load_config(ns.config, ns.overrides)
    except (FileNotFoundError, ValueError) as err:
        print(f"tad-tune plan: {err}", file=sys.stderr)
        return 1
    plan = estimate_memory(cfg, ns.gpus, capacity_gib=ns.capacity_gib, seq_len=ns.seq_len)
    print(plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
