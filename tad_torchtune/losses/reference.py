r"""Plain reference implementations, written to read like the definitions (docs/spec.md §1-2).

fp64 by default, full tensors, no chunking, no closed-form gradients: gradients come from autograd. Used only
by the tests and benchmarks to check the production losses, never by training code. Every function takes
``dtype`` (default ``torch.float64``): the tests also run them in bf16/fp32 to get the error a naive
low-precision implementation makes, which the production losses must not exceed.
"""

from __future__ import annotations

import torch


def _prepare(student_logits, teacher_logits, temperature, dtype=torch.float64):
    vocab = student_logits.size(-1)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits[..., :vocab].to(dtype) / temperature
    return torch.softmax(s, -1), torch.softmax(t, -1)


def _kl_terms(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Elementwise p·log(p/q), 0 where p = 0."""
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))


def _reduce(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, normalize: bool) -> torch.Tensor:
    valid = labels != ignore_index
    total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
    return total / valid.sum().clamp_min(1) if normalize else total


def tad_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    top_k: int = 10,
    beta: float = 2.0,
    temperature: float = 1.0,
    normalize_beta: bool = True,
    ignore_index: int = -100,
    normalize: bool = True,
    return_terms: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """TAD's L_DIV by the definitions of docs/spec.md §1-2, in fp64.

    Args:
        student_logits (torch.Tensor): ``[B, S, V]``.
        teacher_logits (torch.Tensor): ``[B, S, V_T]``, ``V_T >= V`` (cut to ``V``).
        labels (torch.Tensor): ``[B, S]``.
        return_terms (bool): also return a dict of ``[B, S]`` per-token terms (``dkl1``, ``dkl2``,
            ``alpha_t``, ``alpha_s``, ``kl``, ``w`` per row ``[B]``).

    Returns:
        torch.Tensor: 0-d fp64 loss (mean over valid tokens, or sum when ``normalize=False``).
    """
    ps, pt = _prepare(student_logits, teacher_logits, temperature, dtype)
    top = torch.zeros_like(pt, dtype=torch.bool).scatter(-1, pt.topk(top_k, dim=-1).indices, True)
    zero = torch.zeros_like(pt)
    alpha_t = torch.where(top, zero, pt).sum(-1)  # teacher tail mass, summed over the tail directly
    alpha_s = torch.where(top, zero, ps).sum(-1)  # student mass on the teacher's tail
    bucket = torch.where(alpha_t > 0, alpha_t * (torch.log(alpha_t) - torch.log(alpha_s)), torch.zeros_like(alpha_t))
    dkl1 = torch.where(top, _kl_terms(pt, ps), zero).sum(-1) + bucket
    pt_tilde = pt / alpha_t[..., None]
    ps_tilde = ps / alpha_s[..., None]
    dkl2 = torch.where(top | (pt == 0), zero, _kl_terms(pt_tilde, ps_tilde)).sum(-1)
    dkl2 = torch.where(alpha_t > 0, dkl2, torch.zeros_like(dkl2))
    valid = labels != ignore_index
    if normalize_beta:
        mean_alpha = torch.where(valid, alpha_t, torch.zeros_like(alpha_t)).sum(-1) / valid.sum(-1).clamp_min(1)
        w = torch.where(mean_alpha > 0, beta / mean_alpha, torch.zeros_like(mean_alpha))
    else:
        w = torch.full(alpha_t.shape[:1], float(beta), dtype=dtype, device=alpha_t.device)
    per_token = (dkl1 + w[:, None] * alpha_t * dkl2) * temperature**2
    loss = _reduce(per_token, labels, ignore_index, normalize)
    if return_terms:
        kl = _kl_terms(pt, ps).sum(-1)
        return loss, {"dkl1": dkl1, "dkl2": dkl2, "alpha_t": alpha_t, "alpha_s": alpha_s, "kl": kl, "w": w}
    return loss


def forward_kl_reference(
    student_logits, teacher_logits, labels, temperature=1.0, ignore_index=-100, normalize=True, dtype=torch.float64
):
    """KL(p_T ‖ p_S) per token, reduced over valid positions, times τ²."""
    ps, pt = _prepare(student_logits, teacher_logits, temperature, dtype)
    return _reduce(_kl_terms(pt, ps).sum(-1) * temperature**2, labels, ignore_index, normalize)


def reverse_kl_reference(
    student_logits, teacher_logits, labels, temperature=1.0, ignore_index=-100, normalize=True, dtype=torch.float64
):
    """KL(p_S ‖ p_T) per token, reduced over valid positions, times τ²."""
    ps, pt = _prepare(student_logits, teacher_logits, temperature, dtype)
    return _reduce(_kl_terms(ps, pt).sum(-1) * temperature**2, labels, ignore_index, normalize)


def symmetric_kl_reference(
    student_logits,
    teacher_logits,
    labels,
    sym_kd_ratio=0.5,
    temperature=1.0,
    ignore_index=-100,
    normalize=True,
    dtype=torch.float64,
):
    """``r·KL(p_T‖p_S) + (1−r)·KL(p_S‖p_T)``."""
    ps, pt = _prepare(student_logits, teacher_logits, temperature, dtype)
    per_token = sym_kd_ratio * _kl_terms(pt, ps).sum(-1) + (1 - sym_kd_ratio) * _kl_terms(ps, pt).sum(-1)
    return _reduce(per_token * temperature**2, labels, ignore_index, normalize)


def jsd_reference(
    student_logits,
    teacher_logits,
    labels,
    beta=0.5,
    temperature=1.0,
    ignore_index=-100,
    normalize=True,
    dtype=torch.float64,
):
    """``β·KL(p_T‖m) + (1−β)·KL(p_S‖m)`` with ``m = β·p_T + (1−β)·p_S``."""
    ps, pt = _prepare(student_logits, teacher_logits, temperature, dtype)
    m = beta * pt + (1 - beta) * ps
    per_token = beta * _kl_terms(pt, m).sum(-1) + (1 - beta) * _kl_terms(ps, m).sum(-1)
    return _reduce(per_token * temperature**2, labels, ignore_index, normalize)


def todi_reference(
    student_logits, teacher_logits, labels, temperature=1.0, ignore_index=-100, normalize=True, dtype=torch.float64
):
    """ToDi: ``Σ_i w_i·p_T,i·log(p_T,i/p_S,i) + (1−w_i)·p_S,i·log(p_S,i/p_T,i)``, ``w_i = σ(log p_T,i − log p_S,i)``
    held constant."""
    ps, pt = _prepare(student_logits, teacher_logits, temperature, dtype)
    w = torch.sigmoid(torch.log(pt) - torch.log(ps)).detach()
    per_token = (w * _kl_terms(pt, ps) + (1 - w) * _kl_terms(ps, pt)).sum(-1)
    return _reduce(per_token * temperature**2, labels, ignore_index, normalize)
