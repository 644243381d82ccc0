r"""TAD and forward KL from a sparse teacher cache instead of live teacher logits (``docs/teacher_cache.md``).

Per position the cache holds the teacher's top-``K_max`` ids and log-probabilities (sorted, exact), the far
tail's mass :math:`\alpha_F = \sum_{i \in F} p_{T,i}` and its :math:`H_F = \sum_{i \in F} p_{T,i} \log p_{T,i}`
(``F``: the ids outside the top-``K_max``), and ``m`` ids drawn i.i.d. from the renormalised far tail
:math:`p_{T,i} / \alpha_F`, :math:`i \in F`. The loss uses the *estimated teacher distribution*

.. math::

    \hat t_i = p_{T,i} \ (i \in \text{top-}K_{max}), \qquad \hat t_i = \alpha_F \, c_i / m \ (i \in F),

with :math:`c_i` the number of draws of ``i``: :math:`E[\hat t] = p_T` and :math:`\sum_i \hat t_i = 1` exactly.
For any ``K <= K_max``, α_T, w(X) and D_KL1 depend only on the exact entries and the student, so they are
exact; the tail term :math:`\alpha_T D_{KL2}` and the KL are *linear* in :math:`\hat t` once the exact
constants (:math:`H_F`, α_T) are known, so their value and gradient with respect to the student logits are
unbiased: the gradient is live TAD's (docs/spec.md §2) with :math:`p_T` replaced by :math:`\hat t`. With
``K_max = V`` nothing is sampled and both losses equal their live versions.

Imports only ``torch`` (docs/design.md, "Boundaries").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from tad_torchtune.losses.base import gradient_in_forward

_NEG_INF = float("-inf")


class SparseTeacher(NamedTuple):
    """A batch of cached teacher distributions, aligned with the student's ``[B, S]`` positions.

    Attributes:
        top_ids (torch.Tensor): ``[B, S, K_max]`` int64, the teacher's top-``K_max`` ids, most probable first.
        top_logp (torch.Tensor): ``[B, S, K_max]`` fp32 ``log p_T`` of those ids (at the cache's τ).
        tail_logmass (torch.Tensor): ``[B, S]`` fp32 ``log α_F``, log of the mass beyond the top-``K_max``
            (``-inf`` when it is empty or underflows).
        tail_plogp (torch.Tensor): ``[B, S]`` fp32 ``H_F = Σ_{i∈F} p_T,i log p_T,i`` (0 when the tail is empty).
        sample_ids (torch.Tensor): ``[B, S, m]`` int64 ids drawn with replacement from ``p_T / α_F`` on ``F``
            (``m = 0`` only when ``K_max = V``).
    """

    top_ids: torch.Tensor
    top_logp: torch.Tensor
    tail_logmass: torch.Tensor
    tail_plogp: torch.Tensor
    sample_ids: torch.Tensor

    def split(self, sizes: Sequence[int]) -> list[SparseTeacher]:
        """Pieces along the sequence (dim 1) with the given sizes (those of the student's logit chunks)."""
        parts = [t.split(list(sizes), dim=1) for t in self]
        return [SparseTeacher(*fields) for fields in zip(*parts, strict=True)]


class SparseTeacherLoss(nn.Module):
    r"""TAD (paper Eq. 3) or forward KL between the student and a cached sparse teacher.

    Args:
        divergence (str): ``"tad"`` or ``"kl"``. Default: ``"tad"``
        top_k (int): K of TAD, ``1 <= K <= K_max`` of the cache (unused for KL). Default: 10
        beta (float): β of TAD. Default: 2.0
        normalize_beta (bool): ``w(X) = β / mean α_T`` (paper Eq. 3) when True, else ``w = β``. Default: True
        temperature (float): τ; divides the student's logits and multiplies the divergence by τ². The cache
            must have been written at the same τ (the recipe checks the manifest). Default: 1.0
        num_output_chunks (int): pieces a full ``[B, S, V]`` student input is split into. Default: 8
        ignore_index (int): label of ignored positions. Default: -100

    Shapes:
        student ``[B, S, V]`` or chunks ``[B, S_c, V]``; teacher a :class:`SparseTeacher` of the same
        ``[B, S]``; labels ``[B, S]``. Returns a 0-d fp32 tensor, differentiable w.r.t. the student only.

    Raises:
        ValueError: bad hyperparameters; at call time ``top_k > K_max``, ``top_k >= V`` or mismatched shapes.
    """

    def __init__(
        self,
        divergence: str = "tad",
        top_k: int = 10,
        beta: float = 2.0,
        normalize_beta: bool = True,
        temperature: float = 1.0,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
    ):
        super().__init__()
        if divergence not in ("tad", "kl"):
            raise ValueError(f"divergence must be 'tad' or 'kl', got divergence={divergence!r}")
        if int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got top_k={top_k!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got beta={beta!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")
        if int(num_output_chunks) != num_output_chunks or num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be an integer >= 1, got {num_output_chunks!r}")
        self.divergence = divergence
        self.top_k = int(top_k)
        self.beta = float(beta)
        self.normalize_beta = bool(normalize_beta)
        self.temperature = float(temperature)
        self.num_output_chunks = int(num_output_chunks)
        self.ignore_index = int(ignore_index)
        self._last_stats: dict[str, torch.Tensor] = {}

    @classmethod
    def like(cls, loss: nn.Module) -> SparseTeacherLoss:
        """The cache version of a live ``TADLoss`` or ``ForwardKLLoss`` (same K, β, τ, chunks, ignore_index).

        Raises:
            ValueError: any other loss (the cache supports only these two divergences).
        """
        from tad_torchtune.losses.baselines import ForwardKLLoss
        from tad_torchtune.losses.tad import TADLoss

        common = {
            "temperature": loss.temperature,
            "num_output_chunks": loss.num_output_chunks,
            "ignore_index": loss.ignore_index,
        }
        if isinstance(loss, TADLoss):
            return cls("tad", loss.top_k, loss.beta, loss.normalize_beta, **common)
        if isinstance(loss, ForwardKLLoss):
            return cls("kl", **common)
        raise ValueError(
            f"kd_loss is {type(loss).__name__}; a teacher cache supports tad_torchtune.TADLoss and "
            "tad_torchtune.ForwardKLLoss"
        )

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """0-d sums of the last call: ``num_tokens``, ``divergence_sum``, ``kl_sum`` (estimated) and, for TAD,
        ``dkl1_sum``, ``tail_sum`` (estimated α_T·D_KL2), ``alpha_t_sum``, ``w_sum`` with ``num_rows``."""
        return self._last_stats

    def stats(self) -> dict[str, float]:
        """Means of :attr:`last_stats` (per token; ``w_mean`` per row)."""
        s = self._last_stats
        if not s:
            return {}
        n = max(float(s["num_tokens"]), 1.0)
        out = {"num_tokens": float(s["num_tokens"])}
        for key, value in s.items():
            if key == "w_sum":
                out["w_mean"] = float(value) / max(float(s["num_rows"]), 1.0)
            elif key not in ("num_tokens", "num_rows"):
                out[f"{key.removesuffix('_sum')}_mean"] = float(value) / n
        return out

    def alpha_t(self, teacher: SparseTeacher) -> torch.Tensor:
        """``[B, S]`` teacher tail mass beyond the top-K, α_T (exact): the cached top entries past K plus α_F,
        summed over the tail entries themselves (docs/spec.md §3.5)."""
        return teacher.top_logp[..., self.top_k :].float().exp().sum(-1) + teacher.tail_logmass.float().exp()

    def row_weight(self, alpha_t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B]`` w(X) from ``[B, S]`` α_T over each row's valid positions (fp64 sums, as TADLoss)."""
        acc = torch.float32 if alpha_t.device.type == "mps" else torch.float64
        total = torch.where(valid, alpha_t.to(acc), 0.0).sum(-1)
        count = valid.sum(-1).to(acc)
        if not self.normalize_beta:
            return torch.full_like(total, self.beta, dtype=torch.float32)
        mean = (total / count.clamp_min(1.0)).to(torch.float32)
        return torch.where(mean > 0, self.beta / mean.clamp_min(torch.finfo(torch.float32).tiny), 0.0)

    def forward(
        self,
        student_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher: SparseTeacher,
        labels: torch.Tensor,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Divergence summed over valid positions (divided by their count when ``normalize``).

        Args:
            student_logits (torch.Tensor | list[torch.Tensor]): ``[B, S, V]`` or chunks ``[B, S_c, V]``.
            teacher (SparseTeacher): the cache rows of the same ``[B, S]`` positions.
            labels (torch.Tensor): ``[B, S]`` next-token labels; ``ignore_index`` positions are skipped.
            normalize (bool): divide by the number of valid positions. Default: True

        Returns:
            torch.Tensor: 0-d fp32; its gradient is computed during this call, chunk by chunk.
        """
        full = None  # a full [B, S, V] input: its gradient goes into one buffer, not through per-chunk slice views
        if isinstance(student_logits, (list, tuple)):
            chunks = list(student_logits)
        else:
            full = student_logits
            chunks = list(full.detach().tensor_split(min(self.num_output_chunks, full.size(1)), dim=1))
        batch, seq = labels.shape
        vocab = chunks[0].size(-1)
        k_max = teacher.top_ids.size(-1)
        if teacher.top_ids.shape[:2] != (batch, seq) or sum(c.size(1) for c in chunks) != seq:
            raise ValueError(
                f"student covers [{chunks[0].size(0)}, {sum(c.size(1) for c in chunks)}] positions, labels "
                f"{tuple(labels.shape)}, teacher cache rows {tuple(teacher.top_ids.shape[:2])}: they must agree"
            )
        if self.divergence == "tad" and self.top_k > k_max:
            raise ValueError(f"top_k={self.top_k} exceeds the cache's K_max={k_max}; write a cache with k_max >= K")
        if self.divergence == "tad" and self.top_k >= vocab:
            raise ValueError(f"top_k={self.top_k} must be smaller than the vocabulary size V={vocab}")
        inputs = [full] if full is not None else chunks
        need_grad = torch.is_grad_enabled() and any(c.requires_grad for c in inputs)
        with torch.no_grad():
            valid = labels != self.ignore_index
            num_valid = valid.sum().to(torch.float32)
            scale = 1.0 / num_valid.clamp_min(1.0) if normalize else torch.ones((), device=labels.device)
            stats: dict[str, torch.Tensor] = {"num_tokens": num_valid}
            weight = None
            if self.divergence == "tad":
                alpha_t = self.alpha_t(teacher)
                row_w = self.row_weight(alpha_t, valid)
                weight = row_w[:, None].expand(batch, seq)
                has = valid.any(-1)
                stats["w_sum"] = torch.where(has, row_w, 0.0).sum()
                stats["num_rows"] = has.sum().to(torch.float32)
            sizes = [c.size(1) for c in chunks]
            total = torch.zeros((), device=labels.device)
            grads = []
            full_grad = torch.empty_like(full) if (need_grad and full is not None) else None
            start = 0
            pieces = zip(chunks, teacher.split(sizes), valid.split(sizes, 1), strict=True)
            w_pieces = weight.split(sizes, 1) if weight is not None else [None] * len(chunks)
            for (chunk, t_chunk, v_chunk), w_chunk in zip(pieces, w_pieces, strict=True):
                flat = SparseTeacher(*[t.flatten(0, 1) for t in t_chunk])
                w_flat = w_chunk.reshape(-1) if w_chunk is not None else None
                z = chunk.reshape(-1, vocab).float()
                z = z / self.temperature if self.temperature != 1.0 else z  # read-only in _chunk: no copy at τ = 1
                value, grad, chunk_stats = self._chunk(z, flat, v_chunk.reshape(-1), w_flat, need_grad, scale)
                total = total + value
                for key, v in chunk_stats.items():
                    stats[key] = stats.get(key, 0.0) + v
                if grad is not None and full_grad is not None:
                    full_grad[:, start : start + chunk.size(1)].copy_(grad.view(chunk.shape))
                elif grad is not None:
                    grads.append(grad.view(chunk.shape).to(chunk.dtype))
                start += chunk.size(1)
            stats["divergence_sum"] = total
            self._last_stats = stats
            loss = total * scale
        if need_grad:
            return gradient_in_forward(loss, [full_grad] if full_grad is not None else grads, *inputs)
        return loss

    def _chunk(
        self,
        z: torch.Tensor,
        teacher: SparseTeacher,
        valid: torch.Tensor,
        w: torch.Tensor | None,
        need_grad: bool,
        grad_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """One chunk of ``N`` flattened positions: ``z`` ``[N, V]`` fp32 student logits / τ, teacher fields
        ``[N, ...]``, ``w`` ``[N]`` (TAD) or None (KL). Returns the τ²-scaled valid sum, the gradient w.r.t. the
        unscaled logits times ``grad_scale`` (``[N, V]`` fp32) and sums for the stats."""
        k = self.top_k if self.divergence == "tad" else 0
        idx = teacher.top_ids.long()
        lpt = teacher.top_logp.float()
        pt = lpt.exp()
        samples = teacher.sample_ids.long()
        m = samples.size(-1)
        alpha_f = teacher.tail_logmass.float().exp()
        log_ps = torch.log_softmax(z, -1)
        lps_top = log_ps.gather(-1, idx)
        top_terms = torch.where(pt > 0, pt * (lpt - lps_top), 0.0)  # exact p_T log(p_T / p_S), top-K_max
        # Unbiased estimate of Σ_F p_T log(p_T/p_S) = H_F − α_F·E_{i~p̃_F}[log p_S,i]; exact when F is empty.
        cross_far = alpha_f * log_ps.gather(-1, samples).mean(-1) if m else torch.zeros_like(alpha_f)
        far = torch.where(alpha_f > 0, teacher.tail_plogp.float() - cross_far, 0.0)
        kl = top_terms.sum(-1) + far
        tau_sq = self.temperature**2
        row = torch.where(valid, self.temperature * grad_scale, 0.0)
        stats = {"kl_sum": torch.where(valid, kl, 0.0).sum()}
        if self.divergence == "kl":
            per_token = kl
            grad = None
            if need_grad:
                grad = log_ps.exp_()  # p_S − t̂
                grad.scatter_add_(-1, idx, -pt)
                if m:
                    grad.scatter_add_(-1, samples, (-alpha_f / m)[:, None].expand(-1, m))
                grad.mul_(row[:, None])
            value = torch.where(valid, per_token * tau_sq, 0.0).sum()
            return value, grad, stats

        # TAD: α_T and w exact; α_S exact from the student as a shifted sum over the tail (as TADLoss).
        alpha_t = pt[:, k:].sum(-1) + alpha_f
        tail_lps = log_ps.scatter_(-1, idx[:, :k], _NEG_INF)  # in place: log p_S is not read after this
        mx = tail_lps.amax(-1)
        mx = torch.where(torch.isfinite(mx), mx, 0.0)
        q = tail_lps.sub_(mx[:, None]).exp_()  # 0 on the top-K
        sum_q = q.sum(-1)
        log_alpha_s = mx + sum_q.log()
        bucket = torch.where(alpha_t > 0, alpha_t * (alpha_t.log() - log_alpha_s), 0.0)
        dkl1 = top_terms[:, :k].sum(-1) + bucket
        tail_term = top_terms[:, k:].sum(-1) + far - bucket  # α_T·D_KL2, estimated
        per_token = dkl1 + w * tail_term
        stats.update(
            dkl1_sum=torch.where(valid, dkl1, 0.0).sum(),
            tail_sum=torch.where(valid, tail_term, 0.0).sum(),
            alpha_t_sum=torch.where(valid, alpha_t, 0.0).sum(),
        )
        grad = None
        if need_grad:
            # Live TAD's gradient (docs/spec.md §2) with p_T -> t̂: top-K p_S − p_T; tail c_1·p_S − w·t̂ with
            # c_1 = 1 + (w − 1)·α_T/α_S, written on q = p_S·e^{−mx} so it stays finite (as TADLoss).
            ratio = torch.where(sum_q > 0, alpha_t / sum_q, 0.0)
            grad = q.mul_((mx.exp() + (w - 1.0) * ratio)[:, None])
            grad.scatter_(-1, idx[:, :k], lps_top[:, :k].exp() - pt[:, :k])
            grad.scatter_add_(-1, idx[:, k:], -w[:, None] * pt[:, k:])
            if m:
                grad.scatter_add_(-1, samples, (-w * alpha_f / m)[:, None].expand(-1, m))
            grad.mul_(row[:, None])
        value = torch.where(valid, per_token * tau_sq, 0.0).sum()
        return value, grad, stats

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, top_k={self.top_k}, beta={self.beta}, "
            f"normalize_beta={self.normalize_beta}, temperature={self.temperature}"
        )
