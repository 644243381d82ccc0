r"""The paper's baseline divergences behind TADLoss's interface and chunk loop (docs/spec.md §4).

Switching a run between them is one line of YAML (``kd_loss._component_``). Every loss here returns a
*true* divergence (zero when the student equals the teacher); torchtune 0.6.1's ``ForwardKLLoss`` returns
the cross-entropy ``H(p_T, p_S)`` instead, which has the same gradient but never reaches 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tad_torchtune.losses.base import (
    ChunkedDivergenceLoss,
    ChunkResult,
    fold_ce_onehot,
    fold_ce_value,
    plogq_diff,
    sum_nan_as_zero,
)


def _finish(
    loss: ChunkedDivergenceLoss,
    per_token: torch.Tensor,
    grad: torch.Tensor | None,
    valid: torch.Tensor,
    grad_scale: torch.Tensor | float = 1.0,
) -> ChunkResult:
    """Masks ignored positions, applies τ² to the value and τ·grad_scale to the gradient
    (d/dz = (1/τ)·d/d(z/τ))."""
    tau = loss.temperature
    if grad is not None:
        grad.mul_(torch.where(valid, tau * grad_scale, 0.0)[:, None])
    return ChunkResult(torch.where(valid, per_token * tau * tau, 0.0), grad, {})


def _autograd_chunk(
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token divergence and its gradient for one chunk by autograd (for losses with no simple closed
    form). Only this chunk's graph is alive, so memory stays bounded by the chunk size."""
    if not need_grad:
        return divergence(student, teacher), None
    with torch.enable_grad():
        student = student.detach().requires_grad_(True)
        per_token = divergence(student, teacher)
        (grad,) = torch.autograd.grad(torch.where(valid, per_token, 0.0).sum(), student)
    return per_token.detach(), grad


class ForwardKLLoss(ChunkedDivergenceLoss):
    r"""Forward KL :math:`KL(p_T \| p_S) = \sum_i p_{T,i} \log(p_{T,i}/p_{S,i})`: vanilla KD (Hinton).

    Gradient (closed form): :math:`\tau (p_S - p_T)` per student logit.

    Args:
        temperature (float): τ. Default: 1.0
        num_output_chunks (int): pieces a full-tensor input is split into. Default: 8
        ignore_index (int): label of ignored positions. Default: -100
    """

    folds_ce = True

    def chunk_terms(self, student, teacher, valid, prepared, need_grad, grad_scale=1.0, ce=None):
        # Three reused [N, V] buffers, in place: a = log p_S -> gradient; b = log p_T -> KL terms; c = p_T.
        log_ps = torch._log_softmax(student, -1, False, out=self.buffer("a", student))
        ce_sum = fold_ce_value(log_ps, valid, ce[0]) if ce is not None else None
        b = student if self.owns(student) else self.buffer("b", student)
        log_pt = torch._log_softmax(teacher, -1, False, out=b)
        c = teacher if self.owns(teacher) else self.buffer("c", teacher)
        pt = torch.exp(log_pt, out=c)
        kl_terms = log_pt.sub_(log_ps).mul_(pt)
        per_token = sum_nan_as_zero(kl_terms)
        if ce is None:
            grad = log_ps.exp_().sub_(pt) if need_grad else None
            return _finish(self, per_token, grad, valid, grad_scale)
        # With a folded CE (τ = 1): row·(p_S − p_T) + ce_row·(p_S − onehot), in the same two passes.
        result = _finish(self, per_token, None, valid, grad_scale)
        result.stats["ce_sum"] = ce_sum
        if need_grad:
            row = torch.where(valid, self.temperature * grad_scale, 0.0)
            ce_row = torch.where(valid, ce[1], 0.0)
            grad = log_ps.exp_().mul_((row + ce_row)[:, None]).addcmul_(pt, row[:, None], value=-1.0)
            fold_ce_onehot(grad, valid, ce[0], ce_row)
            result.grad = grad
        return result


class ReverseKLLoss(ChunkedDivergenceLoss):
    r"""Reverse KL :math:`KL(p_S \| p_T)` (mode-seeking; MiniLLM's objective, here token-level).

    Gradient (closed form): :math:`\tau\, p_S \odot (\log p_S - \log p_T - KL(p_S\|p_T))`.

    Args: as :class:`ForwardKLLoss`.
    """

    def chunk_terms(self, student, teacher, valid, prepared, need_grad, grad_scale=1.0):
        log_ps = F.log_softmax(student, dim=-1)
        log_pt = F.log_softmax(teacher, dim=-1)
        ps = log_ps.exp()
        per_token = plogq_diff(ps, log_ps, log_pt).sum(-1)
        grad = None
        if need_grad:
            grad = log_ps.sub_(log_pt).sub_(per_token[:, None]).mul_(ps).nan_to_num_(nan=0.0)
        return _finish(self, per_token, grad, valid, grad_scale)


class SymmetricKLLoss(ChunkedDivergenceLoss):
    r"""``sym_kd_ratio · KL(p_T‖p_S) + (1 − sym_kd_ratio) · KL(p_S‖p_T)`` (torchtune's meaning of the ratio).

    Args:
        sym_kd_ratio (float): weight of the forward KL, in [0, 1]. Default: 0.5
        temperature, num_output_chunks, ignore_index: as :class:`ForwardKLLoss`.
    """

    def __init__(
        self,
        sym_kd_ratio: float = 0.5,
        temperature: float = 1.0,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
    ):
        super().__init__(temperature=temperature, num_output_chunks=num_output_chunks, ignore_index=ignore_index)
        if not 0.0 <= sym_kd_ratio <= 1.0:
            raise ValueError(f"sym_kd_ratio must be in [0, 1], got sym_kd_ratio={sym_kd_ratio!r}")
        self.sym_kd_ratio = float(sym_kd_ratio)

    def chunk_terms(self, student, teacher, valid, prepared, need_grad, grad_scale=1.0):
        r = self.sym_kd_ratio
        log_ps = F.log_softmax(student, dim=-1)
        log_pt = F.log_softmax(teacher, dim=-1)
        ps, pt = log_ps.exp(), log_pt.exp()
        fkl = plogq_diff(pt, log_pt, log_ps).sum(-1)
        rkl = plogq_diff(ps, log_ps, log_pt).sum(-1)
        grad = None
        if need_grad:
            reverse = log_ps.sub_(log_pt).sub_(rkl[:, None]).mul_(ps).nan_to_num_(nan=0.0)
            grad = (ps - pt).mul_(r).add_(reverse, alpha=1.0 - r)
        return _finish(self, r * fkl + (1.0 - r) * rkl, grad, valid, grad_scale)


class JSDLoss(ChunkedDivergenceLoss):
    r"""Generalised Jensen-Shannon divergence with mixture :math:`m = \beta p_T + (1-\beta) p_S`:

    .. math:: JSD_\beta = \beta\, KL(p_T \| m) + (1 - \beta)\, KL(p_S \| m)

    (the convention of TRL's ``generalized_jsd_loss``; β = 0.5 is the symmetric JSD).

    Args:
        beta (float): mixture weight of the teacher, in (0, 1). Default: 0.5
        temperature, num_output_chunks, ignore_index: as :class:`ForwardKLLoss`.
    """

    def __init__(
        self, beta: float = 0.5, temperature: float = 1.0, num_output_chunks: int = 8, ignore_index: int = -100
    ):
        super().__init__(temperature=temperature, num_output_chunks=num_output_chunks, ignore_index=ignore_index)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1) for JSD, got beta={beta!r}")
        self.beta = float(beta)

    def _divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        b = self.beta
        log_ps = F.log_softmax(student, dim=-1)
        log_pt = F.log_softmax(teacher, dim=-1)
        log_m = torch.logaddexp(log_pt + torch.log(torch.tensor(b)), log_ps + torch.log(torch.tensor(1.0 - b)))
        fwd = plogq_diff(log_pt.exp(), log_pt, log_m).sum(-1)
        rev = plogq_diff(log_ps.exp(), log_ps, log_m).sum(-1)
        return b * fwd + (1.0 - b) * rev

    def chunk_terms(self, student, teacher, valid, prepared, need_grad, grad_scale=1.0):
        per_token, grad = _autograd_chunk(self._divergence, student, teacher, valid, need_grad)
        return _finish(self, per_token, grad, valid, grad_scale)


class ToDiLoss(ChunkedDivergenceLoss):
    r"""Token-wise Distillation (ToDi, arXiv 2505.16297): per vocabulary entry, a mix of forward and
    reverse KL terms with weight :math:`w_i = \sigma(\log p_{T,i} - \log p_{S,i})` (no gradient):

    .. math:: \sum_i w_i\, p_{T,i} \log\frac{p_{T,i}}{p_{S,i}} + (1 - w_i)\, p_{S,i} \log\frac{p_{S,i}}{p_{T,i}}

    Args: as :class:`ForwardKLLoss`.
    """

    @staticmethod
    def _divergence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_ps = F.log_softmax(student, dim=-1)
        log_pt = F.log_softmax(teacher, dim=-1)
        weight = torch.sigmoid(log_pt - log_ps).detach()
        forward = plogq_diff(log_pt.exp(), log_pt, log_ps)
        reverse = plogq_diff(log_ps.exp(), log_ps, log_pt)
        return (weight * forward + (1.0 - weight) * reverse).sum(-1)

    def chunk_terms(self, student, teacher, valid, prepared, need_grad, grad_scale=1.0):
        per_token, grad = _autograd_chunk(self._divergence, student, teacher, valid, need_grad)
        return _finish(self, per_token, grad, valid, grad_scale)
