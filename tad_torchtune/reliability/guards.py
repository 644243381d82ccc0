"""Numerical guards: a non-finite teacher/student logit, loss or gradient is caught at the step it happens.

Cost: one fused ``isfinite(x).all()`` reduction per watched tensor (a 0-d bool that stays on the device) and
one host sync per optimizer step, when the flags are read together right before ``optimizer.step()``
(after one small all-reduce under FSDP2 so every rank takes the same decision). Gradients are not
scanned again: the total gradient norm the recipe already computes is non-finite iff some gradient is
(or the squares overflow fp32, i.e. a norm above ~1e19, which is no healthier).

Policies (config key ``nonfinite_policy``):

- ``skip`` (default): no optimizer step; gradients are dropped; the step's data window and LR-schedule slot
  are consumed; the count is logged as ``nonfinite_skipped_steps`` and a warning names the tensor.
- ``stop``: raise :class:`NonFiniteError` with a report naming the step, the tensor(s), the micro-batch and
  the batch's first tokens.

Either way no optimizer step ever sees a NaN/inf gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from tad_torchtune.reliability.fault import fault_point, trace_step

log = logging.getLogger(__name__)

POLICIES = ("skip", "stop")
# Report order: the earliest place a non-finite value can enter the step. ``update``: the clipped gradient norm
# times the learning rate(s), i.e. what the optimizer will apply.
_ORDER = ("teacher_logits", "student_logits", "loss", "gradients", "update")


class NonFiniteError(RuntimeError):
    """A non-finite value was detected and ``nonfinite_policy`` is ``stop``."""


def _all_finite(x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        flags = [torch.isfinite(c).all() for c in x if c.numel() > 0]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
    return torch.isfinite(x).all()


def first_nonfinite(state: Any, prefix: str = "") -> str | None:
    """Names the first tensor of a (nested) state dict holding NaN or inf, with counts; None when all are finite.

    One read per floating tensor: an fp32 sum is finite iff every value is (short of values averaging above
    ~1e30, which then get the exact ``isfinite`` check); only a tensor that fails is scanned element-wise.

    Returns:
        str | None: e.g. ``"'tok_embeddings.weight' has 64 NaN and 0 inf of 16576 values (first at index (258, 0))"``.
    """
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point() or value.numel() == 0:
                continue
            t = value.full_tensor() if hasattr(value, "full_tensor") else value
            if bool(torch.isfinite(t.sum(dtype=torch.float32))):
                continue
            finite = torch.isfinite(t)
            if bool(finite.all()):
                continue  # finite values whose sum overflowed fp32
            n_nan = int(torch.isnan(t).sum())
            where = tuple(int(i) for i in (~finite).nonzero()[0].tolist())
            return (
                f"'{name}' has {n_nan} NaN and {int((~finite).sum()) - n_nan} inf of {t.numel()} values "
                f"(first at index {where})"
            )
        elif isinstance(value, (dict, list, tuple)):
            found = first_nonfinite(value, name)
            if found is not None:
                return found
    return None


class NonFiniteGuard:
    """Collects finiteness flags during a step and decides, once, whether the optimizer may step.

    Args:
        policy (str): ``"skip"`` or ``"stop"``. Default: ``"skip"``
        distributed (bool): all-reduce the flags so every rank agrees. Default: False
        num_report_tokens (int): how many leading tokens of the batch the report shows. Default: 16

    Example:
        >>> guard = NonFiniteGuard("skip")
        >>> guard.watch("student_logits", logits)   # during each micro-batch
        >>> guard.watch("loss", loss)
        >>> if guard.before_optimizer_step(step, grad_norm, micro_batches): optimizer.step()
    """

    def __init__(self, policy: str = "skip", distributed: bool = False, num_report_tokens: int = 16):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite_policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.distributed = distributed
        self.num_report_tokens = num_report_tokens
        self.skipped = 0
        self.skipped_steps: list[int] = []
        self.last_report: str | None = None
        self._flags: list[torch.Tensor] = []
        self._where: list[tuple[str, int]] = []
        self._micro = 0

    def watch(self, name: str, x: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Records whether ``x`` (a tensor or a list of logit chunks ``[B, S_c, V]``) is all finite.

        ``name`` ``"loss"`` closes a micro-batch (the next watches belong to the next micro-batch).
        """
        if x is None:
            return
        self._flags.append(_all_finite(x))
        self._where.append((name, self._micro))
        if name == "loss":
            self._micro += 1

    def before_optimizer_step(self, step: int, grad_norm: torch.Tensor, micro_batches: list[dict[str, Any]]) -> bool:
        """Reads the step's flags (one sync); returns True when the optimizer may step.

        Also where the crash tests' hooks fire (:func:`~tad_torchtune.reliability.fault.trace_step` and the
        ``mid_step`` fault point), which do nothing unless a test installed them.

        Args:
            step (int): the global step being taken (1-based).
            grad_norm (torch.Tensor): 0-d total gradient norm (full, not a shard).
            micro_batches (list[dict]): the step's micro-batches (``tokens [B, S]``), for the report.

        Raises:
            NonFiniteError: a value was non-finite and the policy is ``stop``.
        """
        trace_step(step, micro_batches)
        fault_point("mid_step", step)
        flags = self._flags + [_all_finite(torch.as_tensor(grad_norm).detach())]
        where = self._where + [("gradients", -1)]
        self._flags, self._where, self._micro = [], [], 0
        bad = (~torch.stack([f.to(flags[-1].device) for f in flags])).float()
        if self.distributed and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad_list = bad.tolist()
        if not any(bad_list):
            return True
        hits = [w for w, b in zip(where, bad_list, strict=True) if b]
        report = self._report(step, hits, micro_batches)
        self.last_report = report
        if self.policy == "stop":
            raise NonFiniteError(report)
        self.skipped += 1
        self.skipped_steps.append(step)
        log.warning(f"{report}; optimizer step skipped ({self.skipped} skipped so far)")
        return False

    def _report(self, step: int, hits: list[tuple[str, int]], micro_batches: list[dict[str, Any]]) -> str:
        names = sorted({n for n, _ in hits}, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))
        first = names[0]
        micro = next((m for n, m in hits if n == first and m >= 0), 0)
        tokens = micro_batches[min(micro, len(micro_batches) - 1)]["tokens"]
        head = tokens[0, : self.num_report_tokens].tolist()
        where = {"gradients": "after backward", "update": "after clipping, times the learning rate"}.get(
            first, f"micro-batch {micro}"
        )
        return (
            f"non-finite values at step {step}: first in {first} ({where}); non-finite: {', '.join(names)}; "
            f"batch's first tokens (row 0): {head}"
        )
