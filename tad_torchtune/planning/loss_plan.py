"""Which loss a config's run computes and on which path, for the FLOP count and the memory plan alike.

The recipe decides at set-up, on its built models, whether the divergence takes the fused path (no
``[B, S, V]`` logits) or chunked logits (``training.loss_path.fused_blocker``). :func:`plan_loss` asks the same
function on meta-device models built from the config, so ``tad-tune flops``, ``tad-tune plan`` and the run
agree on the path, and says why when it is not fused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tad_torchtune.recipe_settings import FUSED_CHUNK_SIZE, fused_mode, loss_weights, uses_live_teacher
from tad_torchtune.training.loss_path import fused_blocker, loss_blocker

__all__ = ["PlannedLoss", "build_meta_model", "loads_teacher", "plan_loss"]


@dataclass(frozen=True)
class PlannedLoss:
    """The loss a run computes, as the planners count it.

    Attributes:
        kind (str): ``"tad"`` (TADLoss), ``"kl"`` (any other divergence), ``"ce"`` (no divergence from a live
            teacher: ``kd_weight`` 0, no ``kd_loss``, or a teacher cache).
        fused (bool): the fused path (``fused_loss`` and the models allow it).
        chunk_size (int | None): tokens per slice of the fused loss (None on the chunked path).
        why_not_fused (str): the chunked path's reason, as the recipe logs it ("" when fused).
        teacher_loaded (bool): the teacher model is loaded (a live divergence or a cosine term).
    """

    kind: str
    fused: bool
    chunk_size: int | None
    why_not_fused: str
    teacher_loaded: bool


def build_meta_model(node: Any) -> torch.nn.Module:
    """A YAML model node (mapping with ``_component_``) instantiated on the meta device: shapes, no memory."""
    from torchtune import config

    with torch.device("meta"):
        return config.instantiate(node if isinstance(node, DictConfig) else OmegaConf.create(node))


def loads_teacher(cfg: DictConfig) -> bool:
    """Whether the run loads the teacher model: a divergence not served by a teacher cache, or a cosine term."""
    _, kd_weight = loss_weights(cfg)
    return uses_live_teacher(kd_weight, float(cfg.get("cosine_weight", None) or 0.0), cfg.get("teacher_cache", None))


def plan_loss(cfg: DictConfig, student: Any = None, teacher: Any = None, gpus: int = 1) -> PlannedLoss:
    """The loss and path the recipe will take for ``cfg`` (its ``fused_loss: auto`` rule on the models' heads).

    Args:
        cfg (DictConfig): a recipe config.
        student, teacher (Any): the config's models, already built on the meta device; None builds them here
            (the teacher only when it is loaded).
        gpus (int): processes of the run: ``custom_sharded_layers`` matters under FSDP2 only. Default: 1

    Returns:
        PlannedLoss: kind, path, slice size and the reason for chunked logits.
    """
    _, kd_weight = loss_weights(cfg)
    cache = cfg.get("teacher_cache", None)
    kd_node = cfg.get("kd_loss", None)
    component = str(kd_node.get("_component_") or "") if kd_node is not None else ""
    live_divergence = kd_node is not None and kd_weight != 0 and cache is None
    kind = ("tad" if component.endswith("TADLoss") else "kl") if live_divergence else "ce"
    if fused_mode(cfg) == "false":
        why = "fused_loss: false"
    else:
        from torchtune.config._utils import _get_component_from_path

        kd_type = _get_component_from_path(component) if component else None  # a node without one: unknown
        # The config decides first; the models are built (on the meta device) only when their heads matter.
        why = loss_blocker(kd_weight, kd_type, cache is not None) or ""
        if not why:
            student = student if student is not None else build_meta_model(cfg.model)
            teacher = teacher if teacher is not None else build_meta_model(cfg.teacher_model)
            sharded = [str(x) for x in (cfg.get("custom_sharded_layers", None) or [])] if gpus > 1 else []
            tied = hasattr(student.output, "tied_module")
            alone = "output" if "output" in sharded and not tied else None
            if tied and "tok_embeddings" in sharded:
                alone = "tok_embeddings (tied to the output)"
            why = fused_blocker(kd_weight, kd_type, student, teacher, alone) or ""
    fused = why == ""
    # A FusedLinear* kd_loss brings its own chunk_size; otherwise fused_chunk_size or the recipe's default.
    own = OmegaConf.select(cfg, "kd_loss.chunk_size", default=None)
    chunk = int(cfg.get("fused_chunk_size", None) or own or FUSED_CHUNK_SIZE) if fused else None
    return PlannedLoss(kind, fused, chunk, why, loads_teacher(cfg))
