"""One answer to "can this run take the fused loss path?", for the recipe and the memory planner alike.

The fused path (``losses/fused_linear.py``) computes the divergence from final hidden states and output
weights, never the ``[B, S, V]`` logits. It reproduces the materialised path exactly only when both heads are
plain projections ``h Wᵀ (+ b)`` and the divergence is one it is tested for; the recipe then builds it (the
default, ``fused_loss: auto``) and ``tad-tune plan`` budgets memory for it instead of for full logits.
"""

from __future__ import annotations

from typing import Any

from tad_torchtune.losses.baselines import ForwardKLLoss
from tad_torchtune.losses.fused_linear import FusedLinearDistillationLoss, is_plain_projection
from tad_torchtune.losses.tad import TADLoss
from tad_torchtune.recipe_settings import FUSED_CHUNK_SIZE

__all__ = ["FUSABLE_DIVERGENCES", "FUSED_CHUNK_SIZE", "fused_blocker", "loss_blocker"]

#: Divergences the fused path is tested for (a ``FusedLinear*`` kd_loss is fused by construction).
FUSABLE_DIVERGENCES = (TADLoss, ForwardKLLoss)


def loss_blocker(kd_weight: float, kd_loss_type: type | None, teacher_cache: bool = False) -> str | None:
    """The part of :func:`fused_blocker` the config alone decides (no model needed), or ``None``.

    Args:
        kd_weight (float): the recipe's ``kd_weight`` (0: CE only, nothing to fuse).
        kd_loss_type (type | None): the class of ``kd_loss`` (``None`` when there is none).
        teacher_cache (bool): the divergence reads a teacher cache, whose rows meet chunked logits. Default: False
    """
    if teacher_cache:
        return "teacher_cache is set (the cached teacher rows meet the student's logits)"
    if kd_weight == 0 or kd_loss_type is None:
        return "kd_weight is 0 (CE only: there is no divergence to fuse)"
    if not issubclass(kd_loss_type, (FusedLinearDistillationLoss, *FUSABLE_DIVERGENCES)):
        return (
            f"kd_loss is {kd_loss_type.__name__}; the fused path supports TADLoss and ForwardKLLoss "
            "(or a FusedLinear* kd_loss)"
        )
    return None


def fused_blocker(
    kd_weight: float,
    kd_loss_type: type | None,
    student: Any,
    teacher: Any,
    head_sharded_alone: str | None = None,
    teacher_cache: bool = False,
) -> str | None:
    """Why the fused loss cannot be used (a clause for a log line), or ``None`` when it can.

    Args:
        kd_weight, kd_loss_type, teacher_cache: as for :func:`loss_blocker`, checked first.
        student, teacher (Any): the built models (the meta device will do): torchtune ``TransformerDecoder`` s.
        head_sharded_alone (str | None): the name of the student's head when FSDP2 shards it as its own unit
            (``custom_sharded_layers``): the fused path reads its weight inside the root forward, where
            such a head is never whole. Default: None
    """
    why = loss_blocker(kd_weight, kd_loss_type, teacher_cache)
    if why is not None:
        return why
    for role, model in (("student", student), ("teacher", teacher)):
        if not (hasattr(model, "unembed") and hasattr(model, "norm")):
            return f"the {role} ({type(model).__name__}) is not a torchtune TransformerDecoder (.unembed, .norm)"
        out = getattr(model, "output", None)
        if not is_plain_projection(out):
            return (
                f"the {role}'s output is {type(out).__name__}, not a plain nn.Linear or TiedLinear (the fused "
                "loss computes h Wᵀ + b and would not reproduce a head that changes it, e.g. Gemma-2's soft-cap)"
            )
    if head_sharded_alone is not None:
        return (
            f"the student's {head_sharded_alone} is sharded on its own (custom_sharded_layers), so its weight is "
            "never whole"
        )
    return None
