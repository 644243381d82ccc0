r"""Fused linear distillation: the loss takes final hidden states and output projections, never ``[B, S, V]``.

The recipe hands the loss the student's and the teacher's last hidden states (after the final norm) and
their output weights. The loss gathers the *valid* positions (label ``!= ignore_index``: an SFT prompt or
padding costs nothing), walks slices of at most ``chunk_size`` of them, projects each slice to logits,
evaluates the divergence on it with the *same* per-chunk code as the materialised path
(:class:`~tad_torchtune.losses.TADLoss` and the baselines' ``_chunk``), turns the closed-form logit gradient
(paper Eq. 6 for TAD) into gradients for the hidden states and the output weight, and moves on, reusing the
slice's buffers. Live memory is one slice of logits for each model plus ``[V, D]`` for the weight gradient,
instead of two ``[B, S, V]`` logit tensors and their gradient.

Per slice, with student logits ``Z = H Wᵀ + b`` and ``G = ∂L/∂Z`` (``[N, V]``, fp32):

.. math::

    \partial L/\partial H = G\,W, \qquad \partial L/\partial W \mathrel{+}= G^\top H, \qquad
    \partial L/\partial b \mathrel{+}= \textstyle\sum_n G_n,

with the weight gradient accumulated in fp32 across slices (a bf16 accumulator loses low-order bits
over many slices: docs/spec.md §3.8).

**w(X) needs every position's teacher tail mass first** (paper Eq. 3, docs/spec.md §3.7). Two schedules, both
exact (tested equal):

* **Whole rows, one pass** (every row's valid positions fit in ``chunk_size``, e.g. S = 2048 with
  ``chunk_size >= 2048``): rows are packed whole into slices, so a slice holds every position of its
  sequences. Its teacher logits give top-K, α_T and w(X) of its rows, and the divergence reuses that pass's
  ``log p_T`` and ``p_T``: no extra cost over forward KL's teacher work except the top-K and one sum.
* **Rows cut across slices, two passes** (a row longer than ``chunk_size``): a first pass over all slices
  under ``no_grad`` (project, top-K, α_T; keep ``[N]`` floats and ``[N, K]`` ids) gives w(X) per row, then
  the second pass projects the teacher again. Cost: one extra teacher output projection, ``2·D_T·V`` FLOPs
  per token (+6.7 %, 9.27 → 9.89 GFLOP per token for Qwen1.5-1.8B → 1.2B at S = 2048, see
  ``docs/performance.md``), plus a softmax and top-K over ``V``.

Divergences without sequence statistics (forward KL) take one pass either way. With ``temperature=1`` the
student's cross-entropy is folded into TAD's and forward KL's own pass (their ``log p_S`` and gradient), so
``ce_weight`` adds no pass over ``[N, V]``.

This module imports only ``torch`` and our own losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tad_torchtune.losses.base import ChunkedDivergenceLoss, _GradientInForward, masked_sum
from tad_torchtune.losses.baselines import ForwardKLLoss
from tad_torchtune.losses.tad import TADLoss


def _mm_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` in the model dtype.

    On CUDA, bf16/fp16 inputs go straight to an fp32 output (``out_dtype``, torch >= 2.8); elsewhere the
    product is formed in the input dtype (as autograd's own linear backward would) and added in fp32.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a, b))


class FusedLinearDistillationLoss(nn.Module):
    """Any :class:`ChunkedDivergenceLoss` (and optionally CE), computed from hidden states chunk by chunk.

    Args:
        divergence (ChunkedDivergenceLoss): the divergence whose per-chunk math is used (``TADLoss``,
            ``ForwardKLLoss``...). Its temperature and ``ignore_index`` apply.
        chunk_size (int): about how many tokens one slice holds (``S_c = max(1, chunk_size // B)``
            positions of every row). Peak extra memory is about ``3 · chunk_size · V · 4`` bytes.
            Default: 1024
        compile_chunk (bool): ``torch.compile`` the per-slice computation (projection, divergence, CE,
            logit gradient) but not the loop, with ``dynamic=True`` so the last, shorter slice reuses
            the graph. Default: False
        compile_backend (str): the ``torch.compile`` backend. Default: ``"inductor"``
        accumulate_fp32 (bool): accumulate the output-weight gradient in fp32 across slices (returned
            in the weight's dtype). Default: True
        skip_ignored (bool | None): project only the positions whose label is not ``ignore_index`` (SFT
            prompts and padding cost nothing) at the price of one host sync per call to count them;
            ``False`` projects every position in a fixed layout and masks the ignored ones (no host sync).
            ``None``: skip on CPU, where reading a count costs nothing, and not on an accelerator, where the
            sync stalls the launch queue. Default: None

    Call: ``loss = fused(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)``, see
    :meth:`forward`. ``.last_stats`` / ``.stats()`` as on the divergence, plus ``ce_sum``/``ce_mean``.

    Raises:
        ValueError: ``chunk_size < 1``, or a divergence that is not a ``ChunkedDivergenceLoss``.
    """

    def __init__(
        self,
        divergence: ChunkedDivergenceLoss,
        chunk_size: int = 1024,
        compile_chunk: bool = False,
        accumulate_fp32: bool = True,
        compile_backend: str = "inductor",
        skip_ignored: bool | None = None,
    ):
        super().__init__()
        if not isinstance(divergence, ChunkedDivergenceLoss):
            raise ValueError(
                f"divergence must be a tad_torchtune ChunkedDivergenceLoss (TADLoss, ForwardKLLoss...), "
                f"got {type(divergence).__name__}"
            )
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got chunk_size={chunk_size!r}")
        self.divergence = divergence
        self.chunk_size = int(chunk_size)
        self.compile_chunk = bool(compile_chunk)
        self.accumulate_fp32 = bool(accumulate_fp32)
        self.skip_ignored = None if skip_ignored is None else bool(skip_ignored)
        self._step: Callable[..., Any] = (
            torch.compile(_chunk_step, dynamic=True, backend=compile_backend) if compile_chunk else _chunk_step
        )
        self._last_stats: dict[str, torch.Tensor] = {}

    @property
    def ignore_index(self) -> int:
        return self.divergence.ignore_index

    @property
    def temperature(self) -> float:
        return self.divergence.temperature

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """0-d tensor sums of the last call: the divergence's keys plus ``ce_sum`` when CE was computed."""
        return self._last_stats

    def stats(self) -> dict[str, float]:
        """Means of the last call as floats (one host sync), the divergence's ``stats()`` keys."""
        self.divergence._last_stats = self._last_stats
        return self.divergence.stats()

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        normalize: bool = True,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
    ) -> torch.Tensor:
        """``kd_weight · divergence + ce_weight · CE``, summed over valid positions (divided by their count).

        Args:
            student_hidden (torch.Tensor): ``[B, S, D_s]`` final hidden states (after the final norm).
            student_weight (torch.Tensor): ``[V, D_s]`` output projection (or tied embedding) weight.
            teacher_hidden (torch.Tensor): ``[B, S, D_t]``, no gradient is ever computed for it.
            teacher_weight (torch.Tensor): ``[V_T, D_t]`` with ``V_T >= V``; rows past ``V`` are cut before
                the matmul (docs/spec.md §3.6), no gradient.
            labels (torch.Tensor): ``[B, S]`` next-token labels (already shifted); ``ignore_index`` skipped.
            student_bias (torch.Tensor | None): ``[V]``. Default: None
            teacher_bias (torch.Tensor | None): ``[V_T]``. Default: None
            normalize (bool): divide by the number of valid positions (0 valid gives 0). Default: True
            kd_weight (float): weight of the divergence. Default: 1.0
            ce_weight (float): weight of the student's cross-entropy on ``labels`` (at temperature 1),
                computed on the same slices so the recipe needs no logits at all. Default: 0.0

        Returns:
            torch.Tensor: 0-d fp32 loss, differentiable with respect to ``student_hidden``,
            ``student_weight`` and ``student_bias``.

        Raises:
            ValueError: inconsistent shapes, ``V_T < V``, or a hyperparameter invalid for ``V``.
        """
        div = self.divergence
        if student_hidden.dim() != 3 or teacher_hidden.dim() != 3 or labels.dim() != 2:
            raise ValueError(
                "expected student_hidden [B, S, D_s], teacher_hidden [B, S, D_t] and labels [B, S], got "
                f"{tuple(student_hidden.shape)}, {tuple(teacher_hidden.shape)}, {tuple(labels.shape)}"
            )
        if student_hidden.shape[:2] != labels.shape or teacher_hidden.shape[:2] != labels.shape:
            raise ValueError(
                f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} and labels "
                f"{tuple(labels.shape)} must share [B, S]"
            )
        if student_weight.dim() != 2 or student_weight.size(1) != student_hidden.size(2):
            raise ValueError(
                f"student_weight must be [V, D_s={student_hidden.size(2)}], got {tuple(student_weight.shape)}"
            )
        if teacher_weight.dim() != 2 or teacher_weight.size(1) != teacher_hidden.size(2):
            raise ValueError(
                f"teacher_weight must be [V_T, D_t={teacher_hidden.size(2)}], got {tuple(teacher_weight.shape)}"
            )
        vocab = student_weight.size(0)
        if teacher_weight.size(0) < vocab:
            raise ValueError(
                f"teacher vocabulary ({teacher_weight.size(0)}) is smaller than the student's ({vocab}); the "
                "teacher's may only extend the student's (its extra rows are cut). Use models with a shared vocabulary."
            )
        div._check_vocab(vocab)
        batch, seq = labels.shape
        inv_tau = 1.0 / div.temperature
        # Cut the teacher's extra vocabulary rows before the matmul: same logits, fewer FLOPs.
        t_weight = teacher_weight[:vocab].detach()
        t_bias = teacher_bias[:vocab].detach() if teacher_bias is not None else None

        inputs = [("hidden", student_hidden), ("weight", student_weight), ("bias", student_bias)]
        grad_enabled = torch.is_grad_enabled()
        wanted = {name: t is not None and grad_enabled and t.requires_grad for name, t in inputs}
        need_grad = any(wanted.values())
        flat_labels = labels.reshape(-1)
        valid_flat = flat_labels != div.ignore_index
        skip_ignored = self.skip_ignored if self.skip_ignored is not None else labels.device.type == "cpu"
        if skip_ignored:
            # Only valid positions are projected (an SFT batch's prompt and padding cost nothing): the slices
            # depend on the counts, one host sync.
            counts = valid_flat.view(batch, seq).sum(1).tolist()
            num_positions = sum(counts)
            positions = None if num_positions == batch * seq else valid_flat.nonzero().squeeze(1)
            row_of = torch.repeat_interleave(
                torch.arange(batch, device=labels.device), torch.tensor(counts, device=labels.device)
            )
            num_valid = torch.tensor(float(num_positions), dtype=torch.float32, device=labels.device)
        else:
            # Every position is projected and ignored ones are masked: slices of a fixed layout, no host sync.
            counts, positions = [seq] * batch, None
            row_of = torch.arange(batch * seq, device=labels.device) // seq  # (repeat_interleave would sync)
            num_valid = valid_flat.sum().to(torch.float32)
        # Slices of whole rows hold every position of their sequences, so TAD's w(X) comes from the slice
        # itself: one teacher projection per slice instead of two (see the module docstring).
        bounds, whole_rows = _slices(counts, self.chunk_size)
        single_pass = div._needs_prepare and whole_rows
        picks = [slice(a, b) if positions is None else positions[a:b] for a, b in bounds]
        row_ids = [row_of[a:b] for a, b in bounds]
        label_chunks = [flat_labels[pick] for pick in picks]
        valid_chunks = [lab != div.ignore_index for lab in label_chunks]
        s_hidden_flat = student_hidden.detach().reshape(-1, student_hidden.size(2))
        t_hidden_flat = teacher_hidden.detach().reshape(-1, teacher_hidden.size(2))

        def teacher_logits(pick: slice | torch.Tensor) -> torch.Tensor:
            logits = _project(div, "teacher_logits", t_hidden_flat[pick], t_weight, t_bias)
            return logits.mul_(inv_tau) if inv_tau != 1.0 else logits

        with torch.no_grad():
            scale = 1.0 / num_valid.clamp_min(1.0) if normalize else torch.ones((), device=labels.device)
            kd_scale = scale * kd_weight
            ce_scale = scale * ce_weight
            # Ignored positions get a zero gradient; [B*S, D] view for the slices' rows.
            grad_h = torch.zeros_like(student_hidden) if wanted["hidden"] else None
            grad_h_flat = grad_h.view(-1, grad_h.size(2)) if grad_h is not None else None
            acc_dtype = torch.float32 if self.accumulate_fp32 else student_weight.dtype
            grad_w = torch.zeros(student_weight.shape, dtype=acc_dtype, device=student_weight.device)
            grad_w = grad_w if wanted["weight"] else None
            grad_b = torch.zeros(vocab, dtype=acc_dtype, device=student_weight.device) if wanted["bias"] else None
            total_kd = torch.zeros((), dtype=torch.float32, device=labels.device)
            total_ce = torch.zeros((), dtype=torch.float32, device=labels.device)
            stats: dict[str, torch.Tensor] = {}
            prepared_stats: dict[str, torch.Tensor] = {}
            s_bias = student_bias.detach() if student_bias is not None else None
            s_weight = student_weight.detach()
            # Let the divergence reuse its [N, V] scratch buffers across slices (and calls, on CPU), as in its
            # own forward; not under compile, where a growing dict of buffers would only cause recompiles.
            div._workspace = None
            if not self.compile_chunk:
                div._open_workspace(student_hidden.device, max((lab.numel() for lab in label_chunks), default=1))
            try:
                # Pass 1 (TAD, when a row is cut across slices): teacher top-K ids and α_T of every position,
                # then w(X) per row, before any slice's tail term can be weighted.
                div._prepared_stats = {}
                if div._needs_prepare and not single_pass:
                    items = [div._prepare_chunk(teacher_logits(p), v) for p, v in zip(picks, valid_chunks, strict=True)]
                    prepared = div._finish_prepare_rows(items, row_ids, valid_chunks, batch)
                    prepared_stats = dict(div._prepared_stats)
                else:
                    prepared = [None] * len(picks)
                chunks = zip(picks, row_ids, label_chunks, valid_chunks, prepared, strict=True)
                for pick, rows, lab, valid, prep in chunks:
                    hs = s_hidden_flat[pick]
                    teacher = teacher_logits(pick)
                    if single_pass:
                        # The slice's rows are complete: w(X) from this slice's own teacher pass, whose log p_T
                        # and p_T the divergence pass then reuses.
                        item = div._prepare_chunk(teacher, valid, keep=True)
                        (prep,) = div._finish_prepare_rows([item], [rows], [valid], batch)
                        for key, value in div._prepared_stats.items():
                            prepared_stats[key] = prepared_stats[key] + value if key in prepared_stats else value
                    per_token, ce, grad_logits, chunk_stats = self._step(
                        div, hs, s_weight, s_bias, teacher, lab, valid, prep,
                        need_grad, inv_tau, kd_scale, ce_scale, ce_weight != 0.0,
                    )  # fmt: skip
                    total_kd = total_kd + per_token.sum()
                    total_ce = total_ce + ce
                    for key, value in chunk_stats.items():
                        stats[key] = stats[key] + value if key in stats else value
                    if need_grad:
                        g = grad_logits.to(student_weight.dtype)
                        if grad_h_flat is not None:
                            grad_h_flat[pick] = g @ s_weight
                        if grad_w is not None:
                            _mm_accumulate(grad_w, g.t(), hs)
                        if grad_b is not None:
                            grad_b.add_(g.sum(0))
                    del grad_logits, per_token, teacher
            finally:
                div._close_workspace()
            stats.update(prepared_stats)
            stats["num_tokens"] = num_valid
            stats["divergence_sum"] = total_kd
            if ce_weight != 0.0:
                stats["ce_sum"] = total_ce
            self._last_stats = stats
            loss = (kd_weight * total_kd + ce_weight * total_ce) * scale

        if not need_grad:
            return loss
        grads = {"hidden": grad_h, "weight": grad_w, "bias": grad_b}
        names = [name for name, _ in inputs if wanted[name]]
        out_grads = [grads[n] if n == "hidden" else grads[n].to(dict(inputs)[n].dtype) for n in names]
        return _GradientInForward.apply(loss, out_grads, *[dict(inputs)[n] for n in names])

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, compile_chunk={self.compile_chunk}, skip_ignored={self.skip_ignored}"


def _chunk_step(
    div: ChunkedDivergenceLoss,
    hs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    prepared: Any,
    need_grad: bool,
    inv_tau: float,
    kd_scale: torch.Tensor,
    ce_scale: torch.Tensor,
    with_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """One slice: project, divergence (the divergence's own ``_chunk``), optional CE, combined logit gradient.

    Returns the per-token divergence ``[N]``, the CE sum (0-d), the gradient ``[N, V]`` fp32 of the *scaled*
    total loss with respect to the student logits (or None) and the divergence's chunk statistics.
    """
    # Model dtype, exactly what the model's output layer would give; into a reused buffer outside compile.
    logits = F.linear(hs, weight, bias) if div._workspace is None else _project(div, "student_logits", hs, weight, bias)
    student = logits.to(torch.float32)
    ce = torch.zeros((), dtype=torch.float32, device=hs.device)
    ce_grad = None
    if with_ce and inv_tau == 1.0 and div._folds_ce:
        # The divergence adds CE to its own value and gradient from its log p_S (CE is at τ = 1): no extra
        # passes over [N, V].
        res = div._chunk(student, teacher, valid, prepared, need_grad, kd_scale, ce=(labels, ce_scale))
        ce = res.stats.pop("ce_sum")
        return res.per_token, ce, res.grad, res.stats
    if with_ce:
        # CE at temperature 1 on the unscaled logits; its gradient is softmax − one-hot.
        log_p = torch.log_softmax(student, dim=-1)
        target = torch.where(valid, labels, 0)[:, None]
        ce = masked_sum(-log_p.gather(-1, target).squeeze(-1), valid)
        if need_grad:
            ce_grad = log_p.exp_()
            ce_grad.scatter_(-1, target, ce_grad.gather(-1, target) - 1.0)  # one entry per row: no atomics
            ce_grad.mul_(torch.where(valid, ce_scale, 0.0)[:, None])
        del log_p
    student = student.mul_(inv_tau) if inv_tau != 1.0 else student
    # The divergence folds kd_scale into its gradient (no extra pass over [N, V]); the gradient may be the
    # divergence's scratch buffer, valid until its next chunk: the caller consumes it before then.
    res = div._chunk(student, teacher, valid, prepared, need_grad, kd_scale)
    grad = res.grad
    if grad is not None and ce_grad is not None:
        grad = grad.add_(ce_grad)
    return res.per_token, ce, grad, res.stats


def _slices(counts: list[int], chunk_size: int) -> tuple[list[tuple[int, int]], bool]:
    """``[start, end)`` of each slice of the valid positions (row-major, ``counts[r]`` of them in row ``r``).

    When every row fits in ``chunk_size``, whole rows are packed greedily (``True``: each slice holds complete
    sequences, what lets TAD make one pass); otherwise the positions are cut every ``chunk_size`` (``False``).
    """
    total = sum(counts)
    if total == 0:
        return [], True
    if max(counts) > chunk_size:
        return [(a, min(a + chunk_size, total)) for a in range(0, total, chunk_size)], False
    bounds: list[tuple[int, int]] = []
    start = end = 0
    for n in counts:
        if end + n - start > chunk_size:
            bounds.append((start, end))
            start = end
        end += n
    bounds.append((start, end))
    return bounds, True


def _project(
    div: ChunkedDivergenceLoss, name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``[N, V]`` fp32 logits ``hidden @ weight.T + bias`` formed in the model's dtype (as ``F.linear``) in the
    divergence's reused scratch buffers: a fresh ``[N, V]`` tensor per slice costs page faults on CPU."""
    n, vocab = hidden.size(0), weight.size(0)
    low_precision = weight.dtype != torch.float32
    out = div._buffer_of(name + "_model_dtype" if low_precision else name, n, vocab, hidden.device, weight.dtype)
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)
    if low_precision:
        out = div._buffer_of(name, n, vocab, hidden.device).copy_(out)
    return out


class FusedLinearTADLoss(FusedLinearDistillationLoss):
    """TAD (paper Eq. 4-6) from hidden states and output weights; arguments as :class:`TADLoss` plus the
    fused ones. ``_component_: tad_torchtune.losses.fused_linear.FusedLinearTADLoss`` in a config.

    Example:
        >>> fused = FusedLinearTADLoss(top_k=5, chunk_size=64)
        >>> hs, ws = torch.randn(2, 16, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
        >>> ht, wt = torch.randn(2, 16, 12), torch.randn(50, 12)
        >>> loss = fused(hs, ws, ht, wt, torch.randint(0, 50, (2, 16)))
        >>> loss.backward()
    """

    def __init__(
        self,
        top_k: int = 10,
        beta: float = 2.0,
        temperature: float = 1.0,
        normalize_beta: bool = True,
        ignore_index: int = -100,
        track_topk_overlap: bool = True,
        chunk_size: int = 1024,
        compile_chunk: bool = False,
        accumulate_fp32: bool = True,
        compile_backend: str = "inductor",
        skip_ignored: bool | None = None,
    ):
        divergence = TADLoss(
            top_k=top_k,
            beta=beta,
            temperature=temperature,
            normalize_beta=normalize_beta,
            ignore_index=ignore_index,
            track_topk_overlap=track_topk_overlap,
        )
        super().__init__(divergence, chunk_size, compile_chunk, accumulate_fp32, compile_backend, skip_ignored)


class FusedLinearForwardKLLoss(FusedLinearDistillationLoss):
    """Vanilla KD (forward KL, the paper's baseline) on the same fused machinery as :class:`FusedLinearTADLoss`."""

    def __init__(
        self,
        temperature: float = 1.0,
        ignore_index: int = -100,
        chunk_size: int = 1024,
        compile_chunk: bool = False,
        accumulate_fp32: bool = True,
        compile_backend: str = "inductor",
        skip_ignored: bool | None = None,
    ):
        divergence = ForwardKLLoss(temperature=temperature, ignore_index=ignore_index)
        super().__init__(divergence, chunk_size, compile_chunk, accumulate_fp32, compile_backend, skip_ignored)


# --------------------------------------------------------------------------------------------------
# torchtune 0.6.1 integration: final hidden states without logits, output weights, one training forward.


def is_plain_projection(out: object) -> bool:
    """True for an output layer whose logits are exactly ``h Wᵀ (+ b)``, the only heads a fused loss may read.

    ``nn.Linear`` and torchtune's ``TiedLinear`` qualify, and so do subclasses that do not override how they
    compute (FSDP2's ``fully_shard`` swaps in such a subclass, e.g. ``FSDPLinear``); subclasses that change
    the logits (Gemma-2's soft-capped head, LoRA) do not. The recipe and :func:`output_projection` both ask
    this function. ``TiedLinear`` is recognised by name in the class's ancestry (this package imports only
    torch).
    """
    if isinstance(out, nn.Linear):
        return type(out).forward is nn.Linear.forward
    tied = next((c for c in type(out).__mro__ if c.__name__ == "TiedLinear"), None)
    return tied is not None and hasattr(out, "tied_module") and type(out).__call__ is tied.__call__


def output_projection(model: nn.Module, gather: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[V, D]`` weight (and bias) of a torchtune ``TransformerDecoder``'s output layer.

    Handles ``nn.Linear`` and torchtune's ``TiedLinear`` (tied embeddings: the embedding's weight), plain or
    wrapped by FSDP2 (:func:`is_plain_projection`). With ``gather=True`` an FSDP2-sharded weight (a DTensor)
    is all-gathered once with ``full_tensor()``: use it for the frozen teacher only (its all-gather has no
    gradient path back to the shards). The student's weight must be read inside its root forward, where
    FSDP2 has already unsharded it and reduce-scatters its gradient (see :func:`fused_distillation_loss`).

    Raises:
        ValueError: a model whose ``output`` is not a plain projection.
    """
    out = getattr(model, "output", None)
    if not is_plain_projection(out):
        raise ValueError(
            f"expected a torchtune TransformerDecoder whose .output is a plain nn.Linear or TiedLinear, got "
            f"{type(out).__name__} (a head that transforms the projection, e.g. a logit soft-cap, cannot be "
            "fused); use the chunked-logits loss, or pass the weight to the fused loss yourself"
        )
    if isinstance(out, nn.Linear):
        weight, bias = out.weight, out.bias
    else:
        weight, bias = out.tied_module.weight, None
    if gather:
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


@contextmanager
def _unembed_replaced(model: nn.Module, head: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    # TransformerDecoder.forward ends with ``self.unembed(h)`` (norm + output); an instance attribute
    # shadows the method for the duration of one forward, which keeps FSDP2's root hooks in place.
    if not hasattr(model, "unembed") or not hasattr(model, "norm"):
        raise ValueError(
            f"expected a torchtune TransformerDecoder (with .unembed and .norm), got {type(model).__name__}"
        )
    # object.__setattr__: nn.Module.__setattr__ would register a module value as a child instead.
    object.__setattr__(model, "unembed", head)
    try:
        yield
    finally:
        del model.__dict__["unembed"]


def final_hidden_states(model: nn.Module, tokens: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """``[B, S, D]`` hidden states after the final norm of a torchtune ``TransformerDecoder``; no logits.

    torchtune 0.6.1 has no ``skip_output_layer``; this runs the model's own forward (embeddings, layers,
    activation checkpointing, FSDP2 hooks) with ``unembed`` replaced by the final norm for one call.
    """
    with _unembed_replaced(model, model.norm):
        out = model(tokens, **forward_kwargs)
    return out[-1] if isinstance(out, list) else out


def fused_distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: FusedLinearDistillationLoss,
    *,
    normalize: bool = False,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """One micro-batch's fused loss from the two models: the drop-in for the recipe's logits + losses.

    The teacher runs under ``no_grad`` to its final norm; its output weight is gathered once (FSDP2). The
    student's loss is computed *inside* its forward (``unembed`` replaced), so under FSDP2 the student's
    output weight is the unsharded parameter of the root's own all-gather (once per step, never per
    chunk) and its gradient goes through FSDP2's reduce-scatter like any other.

    Args:
        student, teacher (nn.Module): torchtune ``TransformerDecoder`` s (possibly FSDP2-wrapped).
        tokens (torch.Tensor): ``[B, S]`` input ids; labels ``[B, S]`` already shifted.
        loss_fn (FusedLinearDistillationLoss): e.g. :class:`FusedLinearTADLoss`.
        normalize (bool): see :meth:`FusedLinearDistillationLoss.forward`; training divides the sum by the
            step's global token count, hence ``False`` by default.
        kd_weight, ce_weight (float): the recipe's ``kd_ratio`` and ``1 - kd_ratio`` (paper: 1 and 1).
        **forward_kwargs: ``mask``, ``input_pos`` for both models.

    Returns:
        torch.Tensor: 0-d fp32 loss; ``.backward()`` reaches every student parameter.
    """
    with torch.no_grad():
        t_hidden = final_hidden_states(teacher, tokens, **forward_kwargs)
        t_weight, t_bias = output_projection(teacher, gather=True)

    def head(h: torch.Tensor) -> torch.Tensor:
        s_weight, s_bias = output_projection(student)
        return loss_fn(
            student.norm(h), s_weight, t_hidden, t_weight, labels, student_bias=s_bias, teacher_bias=t_bias,
            normalize=normalize, kd_weight=kd_weight, ce_weight=ce_weight,
        )  # fmt: skip

    with _unembed_replaced(student, head):
        out = student(tokens, **forward_kwargs)
    return out[-1] if isinstance(out, list) else out
