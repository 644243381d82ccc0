r"""Tail-Aware Distillation loss (arXiv 2602.20816, Eq. 2-6; conventions of ``docs/spec.md``).

For one position with teacher top-K set :math:`S_K` (by teacher probability), teacher tail mass
:math:`\alpha_T = 1 - \sum_{i \in S_K} p_{T,i}` and student mass :math:`\alpha_S` on the same tail:

.. math::

    D_{KL1} = \sum_{i \in S_K} p_{T,i} \log \frac{p_{T,i}}{p_{S,i}} + \alpha_T \log \frac{\alpha_T}{\alpha_S},
    \qquad
    D_{KL2} = \sum_{i \notin S_K} \tilde p_{T,i} \log \frac{\tilde p_{T,i}}{\tilde p_{S,i}},

    L_{DIV} = D_{KL1} + w(X)\, \alpha_T\, D_{KL2}, \qquad w(X) = \frac{\beta}{\tfrac1N \sum_t \alpha_T(t)}.

``KL = D_KL1 + α_T·D_KL2`` exactly (paper Eq. 2), so the code computes ``L_DIV = KL + (w − 1)·α_T·D_KL2``
and the gradient of paper Eq. 6 in closed form, chunk by chunk, during the forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tad_torchtune.losses.base import (
    ChunkedDivergenceLoss,
    ChunkResult,
    fold_ce_onehot,
    fold_ce_value,
    masked_sum,
    sum_nan_as_zero,
)

_NEG_INF = float("-inf")
_INF = float("inf")


class _TeacherPass:
    """Per-chunk results of the first (no-grad) teacher pass, reused by the second pass."""

    __slots__ = ("topk_idx", "alpha", "weight", "log_pt", "pt")

    def __init__(
        self,
        topk_idx: torch.Tensor,
        alpha: torch.Tensor,
        log_pt: torch.Tensor | None = None,
        pt: torch.Tensor | None = None,
    ):
        self.topk_idx = topk_idx  # [N, K] teacher's top-K ids
        self.alpha = alpha  # [N] α_T, summed over the tail entries themselves (never 1 − Σ top-K)
        self.weight: torch.Tensor | None = None  # [N] w(X) of each position's row
        # [N, V] log p_T and p_T, kept only when the divergence pass follows at once on the same chunk
        # (single-pass use, e.g. a fused slice holding whole rows): that pass then skips its own softmax.
        self.log_pt = log_pt
        self.pt = pt


_TOPK_BLOCK = 64


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the ``k`` largest entries of each row of ``x`` (``[N, V]`` -> ``[N, k]``, unordered).

    Same set as ``x.topk(k).indices`` (up to the choice among exactly tied values), 3-4x faster for large
    vocabularies on CPU: every top-k entry lies in one of the ``k`` blocks of ``_TOPK_BLOCK`` ids with the
    largest maxima (a block holding a top-k entry is beaten only by blocks holding larger entries, and
    there are fewer than ``k`` of those), so one cheap ``amax`` pass over ``x`` replaces the row-wise
    selection over ``V`` entries, which then runs on ``k·_TOPK_BLOCK`` gathered candidates.
    """
    n, vocab = x.shape
    b = _TOPK_BLOCK
    n_blocks = vocab // b
    if n_blocks < 4 * k or x.stride(-1) != 1:
        return x.topk(k, dim=-1, sorted=False).indices
    maxima = x.as_strided((n, n_blocks, b), (x.stride(0), b, 1)).amax(-1)
    if vocab % b:
        maxima = torch.cat([maxima, x[:, n_blocks * b :].amax(-1, keepdim=True)], dim=-1)
    blocks = maxima.topk(k, dim=-1, sorted=False).indices
    ids = (blocks[:, :, None] * b + torch.arange(b, device=x.device)).view(n, k * b)
    outside = ids >= vocab  # the last, partial block's padding
    ids = ids.clamp_max_(vocab - 1)
    candidates = x.gather(-1, ids).masked_fill_(outside, _NEG_INF)
    return ids.gather(-1, candidates.topk(k, dim=-1, sorted=False).indices)


class TADLoss(ChunkedDivergenceLoss):
    r"""Tail-Aware Distillation divergence :math:`L_{DIV}` (paper Eq. 3; the recipe adds CE, Eq. 4).

    A drop-in for torchtune's ``kd_loss`` slot (``kd_loss._component_=tad_torchtune.TADLoss``).

    Args:
        top_k (int): K, the size of the teacher's top set. Paper: 1, 5, 10 or 20 (best 5-10). Default: 10
        beta (float): β > 0, the tail weight. Paper default 2 (β < 1 degrades). Default: 2.0
        temperature (float): τ, divides both logits before every quantity, α included; the divergence
            is multiplied by τ². Default: 1.0
        normalize_beta (bool): use the sequence-normalised weight ``w(X) = β / mean_t α_T(t)`` over each
            row's valid positions (paper default). ``False`` gives the unnormalised ``D_KL1 + β·α_T·D_KL2``,
            which is exact KL at β = 1. Default: True
        num_output_chunks (int): pieces a full ``[B, S, V]`` input is split into. Default: 8
        ignore_index (int): label of ignored positions. Default: -100
        track_topk_overlap (bool): also compute the top-K overlap between teacher and student for
            logging (one extra top-K over the student chunk). Default: True

    Shapes:
        student ``[B, S, V]`` (or chunks ``[B, S_c, V]``), teacher ``[B, S, V_T]`` with ``V_T >= V``,
        labels ``[B, S]``; returns a 0-d fp32 tensor.

    .. note::
        A *row* of the batch is a sequence X (docs/spec.md §3.1): w(X) is never shared across rows,
        micro-batches or ranks, so it needs no communication. The student's mass is always taken on the
        *teacher's* top-K ids. Gradients flow to the student logits only.

    Raises:
        ValueError: ``top_k < 1``, ``beta <= 0``, ``temperature <= 0``; at call time ``top_k >= V`` or
            inconsistent shapes.

    Example:
        >>> loss_fn = TADLoss(top_k=5, beta=2.0)
        >>> student = torch.randn(2, 16, 100, requires_grad=True)
        >>> teacher = torch.randn(2, 16, 100)
        >>> labels = torch.randint(0, 100, (2, 16))
        >>> loss = loss_fn(student, teacher, labels)
        >>> loss.backward()
        >>> sorted(loss_fn.stats())[:3]
        ['alpha_t_mean', 'divergence_mean', 'dkl1_mean']
    """

    needs_row_stats = True
    folds_ce = True
    stat_denominators: ClassVar[dict[str, str]] = {"w_sum": "num_rows"}

    def __init__(
        self,
        top_k: int = 10,
        beta: float = 2.0,
        temperature: float = 1.0,
        normalize_beta: bool = True,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        track_topk_overlap: bool = True,
    ):
        super().__init__(temperature=temperature, num_output_chunks=num_output_chunks, ignore_index=ignore_index)
        if int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got top_k={top_k!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got beta={beta!r} (the paper uses 2; beta < 1 degrades quickly)")
        self.top_k = int(top_k)
        self.beta = float(beta)
        self.normalize_beta = bool(normalize_beta)
        self.track_topk_overlap = bool(track_topk_overlap)

    def check_vocab(self, vocab: int) -> None:
        if self.top_k >= vocab:
            raise ValueError(
                f"top_k={self.top_k} must be smaller than the vocabulary size V={vocab}, or the tail is empty"
            )

    # First pass: teacher top-K and α_T for every position, then w(X) per row.
    def prepare_chunk(self, teacher: torch.Tensor, valid: torch.Tensor, keep: bool = False) -> _TeacherPass:
        """Teacher top-K ids and α_T of one chunk (``[N, V]`` fp32 / τ, read-only).

        With ``keep`` the chunk's ``log p_T`` and ``p_T`` stay in two scratch buffers for the :meth:`chunk_terms`
        call that follows on the same chunk (no second softmax); the caller must not start another chunk
        in between. ``p_T`` then overwrites ``teacher`` when it is one of our scratch buffers.
        """
        topk_idx = topk_indices(teacher, self.top_k)
        if keep:
            log_pt = torch._log_softmax(teacher, -1, False, out=self.buffer("log_pt", teacher))
            probs = torch.exp(log_pt, out=teacher if self.owns(teacher) else self.buffer("pt", teacher))
            top = probs.gather(-1, topk_idx)
            alpha = probs.scatter_(-1, topk_idx, 0.0).sum(-1)
            probs.scatter_(-1, topk_idx, top)  # restore p_T for the divergence pass
            return _TeacherPass(topk_idx, alpha, log_pt, probs)
        probs = torch._softmax(teacher, -1, False, out=self.buffer("prepare", teacher))
        # Tail mass as a sum over the tail entries (docs/spec.md §3.5): no cancellation when the top-K holds
        # nearly all the mass; it is 0 only when every tail probability underflows fp32.
        alpha = probs.scatter_(-1, topk_idx, 0.0).sum(-1)
        return _TeacherPass(topk_idx, alpha)

    def finish_prepare_rows(
        self,
        items: list[_TeacherPass],
        row_ids: list[torch.Tensor],
        valid_chunks: list[torch.Tensor],
        num_rows: int,
    ) -> tuple[list[_TeacherPass], dict[str, torch.Tensor]]:
        """w(X) of every position (paper Eq. 3) from the first pass's α_T: ``β / mean α_T`` over each row's
        valid positions. ``row_ids[i]`` is the ``[N_i]`` row (sequence) of each position of chunk ``i``, so
        the chunks may hold any positions of any rows (e.g. only the valid ones). Statistics: ``w_sum`` over
        ``num_rows``, the rows with a valid position."""
        # Per-row sums in fp64 as a masked column sum (no index_add_): an fp32 accumulation of 4096 near-equal
        # α_T erred by 1.3e-6 in w(X) (test_gpu_readiness.py; up to 1e-5 reported), and index_add_'s atomics
        # vary run to run on CUDA; a plain reduction is deterministic, needs no host sync, costs [N, rows] fp64.
        device = items[0].alpha.device
        acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no fp64; its sum is a tree
        alpha_sum = torch.zeros(num_rows, dtype=acc, device=device)
        count = torch.zeros(num_rows, dtype=acc, device=device)
        row_range = torch.arange(num_rows, device=device)
        for item, rows, valid in zip(items, row_ids, valid_chunks, strict=True):
            member = (rows[:, None] == row_range[None, :]) & valid[:, None]  # [N, rows]
            alpha_sum += torch.where(member, item.alpha.to(acc)[:, None], 0.0).sum(0)
            count += member.sum(0)
        has_tokens = count > 0
        if self.normalize_beta:
            mean_alpha = (alpha_sum / count.clamp_min(1.0)).to(torch.float32)
            # Clamp so a denormal mean cannot overflow w; a row whose α_T are all 0 keeps only D_KL1.
            row_w = torch.where(mean_alpha > 0, self.beta / mean_alpha.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        else:
            row_w = torch.full((num_rows,), self.beta, dtype=torch.float32, device=device)
        for item, rows in zip(items, row_ids, strict=True):
            item.weight = row_w[rows]
        stats = {"w_sum": torch.where(has_tokens, row_w, 0.0).sum(), "num_rows": has_tokens.sum().to(torch.float32)}
        return items, stats

    def chunk_terms(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        prepared: _TeacherPass,
        need_grad: bool,
        grad_scale: torch.Tensor | float = 1.0,
        ce: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ChunkResult:
        idx, w, alpha_t = prepared.topk_idx, prepared.weight, prepared.alpha
        stats: dict[str, torch.Tensor] = {}
        if self.track_topk_overlap:
            student_idx = topk_indices(student, self.top_k)
            overlap = (idx[:, :, None] == student_idx[:, None, :]).any(-1).sum(-1).to(torch.float32) / self.top_k
            stats["topk_overlap_sum"] = masked_sum(overlap, valid)
            del student_idx

        # Three [N, V] fp32 buffers, written in place (each line is one pass over the chunk):
        #   a: log p_S -> its tail part;  b: log p_T -> KL terms -> shifted tail p_S (q) -> gradient;  c: p_T.
        # The scaled inputs' own buffers are reused when they are ours; a single-pass first pass hands
        # over log p_T and p_T already computed.
        log_ps = torch._log_softmax(student, -1, False, out=self.buffer("a", student))
        ce_sum = fold_ce_value(log_ps, valid, ce[0]) if ce is not None else None
        if prepared.log_pt is not None:
            log_pt, pt = prepared.log_pt, prepared.pt
            b = log_pt
        else:
            b = student if self.owns(student) else self.buffer("b", student)
            log_pt = torch._log_softmax(teacher, -1, False, out=b)
            c = teacher if self.owns(teacher) else self.buffer("c", teacher)
            pt = torch.exp(log_pt, out=c)
        pt_top = pt.gather(-1, idx)

        # Elementwise p_T·log(p_T/p_S); the tail is summed over its own entries (no cancellation).
        kl_terms = log_pt.sub_(log_ps).mul_(pt)
        topk_kl = kl_terms.gather(-1, idx).nan_to_num_(nan=0.0, posinf=_INF, neginf=_NEG_INF).sum(-1)
        tail_kl = sum_nan_as_zero(kl_terms.scatter_(-1, idx, 0.0))
        kl = topk_kl + tail_kl
        del kl_terms

        # Student mass on the teacher's tail, α_S (docs/spec.md §3.5), as a shifted sum that cannot underflow:
        # with m = max of log p_S over the tail, q = exp(log p_S − m) (tail only) gives α_S = e^m·Σq and
        # log α_S = m + log Σq with Σq >= 1, and the tail gradient's p_S·α_T/α_S = q·α_T/Σq stays finite
        # even where every tail p_S underflows fp32. No data-dependent branch: no host sync, one graph
        # under torch.compile, and the same arithmetic for every row.
        lps_top = log_ps.gather(-1, idx)
        ps_top = lps_top.exp()
        tail_lps = log_ps.scatter_(-1, idx, _NEG_INF)  # a: log p_S on the tail, −inf on the top-K
        m = tail_lps.amax(-1)
        m = torch.where(torch.isfinite(m), m, 0.0)  # a tail all −inf (masked logits): q = 0, α_S = 0
        q = torch.sub(tail_lps, m[:, None], out=b).exp_()  # top-K entries: exp(−inf) = 0
        sum_q = q.sum(-1)
        log_alpha_s = m + sum_q.log()
        log_ratio = alpha_t.log() - log_alpha_s  # log(α_T / α_S); −inf when α_T underflowed
        bucket = torch.where(alpha_t > 0, alpha_t * log_ratio, 0.0)
        dkl1 = topk_kl + bucket
        tail_term = tail_kl - bucket  # α_T · D_KL2
        tau_sq = self.temperature**2
        divergence = kl + (w - 1.0) * tail_term  # = D_KL1 + w·α_T·D_KL2
        per_token = torch.where(valid, divergence * tau_sq, 0.0)

        stats["dkl1_sum"] = masked_sum(dkl1, valid)
        stats["tail_sum"] = masked_sum(tail_term, valid)
        stats["weighted_tail_sum"] = masked_sum(w * tail_term, valid)
        stats["kl_sum"] = masked_sum(kl, valid)
        stats["alpha_t_sum"] = masked_sum(alpha_t, valid)
        stats["alpha_s_sum"] = masked_sum(log_alpha_s.exp(), valid)

        grad = None
        if need_grad:
            # Paper Eq. 6 per unit of the scaled logits z/τ:
            #   top-K: p_S − p_T;   tail: p_S − p_T + (w − 1)·(p_S·α_T/α_S − p_T) = c_1·p_S − w·p_T,
            # with c_1 = 1 + (w − 1)·α_T/α_S per row. d/dz = (1/τ)·d/d(z/τ) and the value carries τ², so the
            # row factor is τ·grad_scale (0 on ignored rows); it is folded into c_1 and w: two passes in all.
            # A folded CE (τ = 1) adds ce_row·(p_S − onehot(label)): ce_row joins c_1 and the top-K entries,
            # and the one-hot goes in last.
            row = torch.where(valid, self.temperature * grad_scale, 0.0)
            ce_row = torch.where(valid, ce[1], 0.0) if ce is not None else None
            # Tail entries are q·(c_1 p_S / q) with p_S = e^m·q: c_q = row·(e^m + (w − 1)·α_T/Σq), finite for
            # every row (0 where the student's tail holds no mass at all).
            ratio = torch.where(sum_q > 0, alpha_t / sum_q, 0.0)
            e_m = m.exp()
            cq = row * (e_m + (w - 1.0) * ratio)
            if ce_row is not None:
                cq = cq + ce_row * e_m
            grad = q.mul_(cq[:, None]).addcmul_(pt, (row * w)[:, None], value=-1.0)
            top_grad = (ps_top - pt_top).mul_(row[:, None])
            if ce_row is not None:
                top_grad.addcmul_(ps_top, ce_row[:, None])
            grad.scatter_(-1, idx, top_grad)
            if ce_row is not None:
                fold_ce_onehot(grad, valid, ce[0], ce_row)
        if ce_sum is not None:
            stats["ce_sum"] = ce_sum
        return ChunkResult(per_token, grad, stats)

    def stats(self) -> dict[str, float]:
        """Means of the last call: ``dkl1_mean``, ``tail_mean`` (α_T·D_KL2), ``weighted_tail_mean``,
        ``kl_mean``, ``alpha_t_mean``, ``alpha_s_mean``, ``w_mean`` (per row), ``topk_overlap_mean``,
        ``divergence_mean`` (L_DIV·τ²) and ``num_tokens``."""
        return super().stats()

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, beta={self.beta}, normalize_beta={self.normalize_beta}, " + super().extra_repr()
