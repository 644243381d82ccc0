r"""Fused linear distillation: the loss takes final hidden states and output projections, never ``[B, S, V]``.

The recipe hands the loss the student's and the teacher's last hidden states (after the final norm) and
their output weights. The loss gathers the *valid* positions (label ``!= ignore_index``: an SFT prompt or
padding costs nothing), walks slices of at most ``chunk_size`` of them, projects each slice to logits,
evaluates the divergence on it with the *same* per-chunk code as the materialised path
(:class:`~tad_torchtune.losses.TADLoss` and the baselines' ``chunk_terms``), turns the closed-form logit gradient
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

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tad_torchtune.losses.base import ChunkKernel, add_sums, fold_ce_onehot, fold_ce_value, gradient_in_forward
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
    """Any chunk kernel (:class:`~tad_torchtune.losses.base.ChunkKernel`: ``TADLoss``, ``ForwardKLLoss``...) and
    optionally CE, computed from hidden states slice by slice.

    Args:
        divergence (ChunkKernel): the divergence whose per-chunk math is used. Its temperature and
            ``ignore_index`` apply.
        chunk_size (int): about how many tokens one slice holds (``S_c = max(1, chunk_size // B)``
            positions of every row). Peak extra memory is about ``3 · chunk_size · V · 4`` bytes.
            Default: 1024
        compile_chunk (bool): ``torch.compile`` the per-slice computation (projection, divergence, CE,
            logit gradient) but not the loop, with ``dynamic=True`` so the last, shorter slice reuses
            the graph. Default: False
        accumulate_fp32 (bool): accumulate the output-weight gradient in fp32 across slices (returned
            in the weight's dtype). Default: True
        compile_backend (str): the ``torch.compile`` backend. Default: ``"inductor"``
        skip_ignored (bool | None): project only the positions whose label is not ``ignore_index`` (SFT
            prompts and padding cost nothing) at the price of one host sync per call to count them;
            ``False`` projects every position in a fixed layout and masks the ignored ones (no host sync).
            ``None``: skip on CPU, where reading a count costs nothing, and not on an accelerator, where the
            sync stalls the launch queue. Default: None

    Call: ``loss = fused(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)``, see
    :meth:`forward`. ``.last_stats`` / ``.stats()`` as on the divergence, plus ``ce_sum``/``ce_mean``.

    Raises:
        ValueError: ``chunk_size < 1``, or a divergence that is not a chunk kernel.
    """

    def __init__(
        self,
        divergence: ChunkKernel,
        chunk_size: int = 1024,
        compile_chunk: bool = False,
        accumulate_fp32: bool = True,
        compile_backend: str = "inductor",
        skip_ignored: bool | None = None,
    ):
        super().__init__()
        if not isinstance(divergence, ChunkKernel):
            raise ValueError(
                "divergence must be a tad_torchtune chunk kernel (a ChunkedDivergenceLoss: TADLoss, "
                f"ForwardKLLoss...), got {type(divergence).__name__}"
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
        return self.divergence.summarize(self._last_stats)

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
        _check_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
        div = self.divergence
        vocab = student_weight.size(0)
        div.check_vocab(vocab)
        inputs = {"hidden": student_hidden, "weight": student_weight, "bias": student_bias}
        grad_enabled = torch.is_grad_enabled()
        wanted = {name: t is not None and grad_enabled and t.requires_grad for name, t in inputs.items()}
        skip_ignored = self.skip_ignored if self.skip_ignored is not None else labels.device.type == "cpu"
        plan = _plan_slices(labels, div.ignore_index, self.chunk_size, skip_ignored, div.needs_row_stats)
        with torch.no_grad():
            scale = 1.0 / plan.num_valid.clamp_min(1.0) if normalize else torch.ones((), device=labels.device)
            grads = _GradientSums(student_hidden, student_weight, wanted, self.accumulate_fp32)
            teacher = _TeacherProjection(div, teacher_hidden, teacher_weight, teacher_bias, vocab)
            student = (student_hidden.detach().reshape(-1, student_hidden.size(2)), student_weight.detach())
            s_bias = student_bias.detach() if student_bias is not None else None
            # The divergence reuses its [N, V] scratch buffers across slices (and calls, on CPU), as in its own
            # forward; not under compile, where a growing dict of buffers would only cause recompiles.
            rows = max((lab.numel() for lab in plan.labels), default=1)
            workspace = nullcontext() if self.compile_chunk else div.workspace(labels.device, rows)
            with workspace:
                total_kd, total_ce, stats = self._pass_loop(
                    plan, student, s_bias, teacher, grads, scale * kd_weight, scale * ce_weight, ce_weight != 0.0
                )
            stats["num_tokens"] = plan.num_valid
            stats["divergence_sum"] = total_kd
            if ce_weight != 0.0:
                stats["ce_sum"] = total_ce
            self._last_stats = stats
            loss = (kd_weight * total_kd + ce_weight * total_ce) * scale
        if not any(wanted.values()):
            return loss
        names = [name for name in inputs if wanted[name]]
        return gradient_in_forward(loss, grads.result(names, inputs), *[inputs[n] for n in names])

    def _pass_loop(
        self,
        plan: _SlicePlan,
        student: tuple[torch.Tensor, torch.Tensor],
        student_bias: torch.Tensor | None,
        teacher: _TeacherProjection,
        grads: _GradientSums,
        kd_scale: torch.Tensor,
        ce_scale: torch.Tensor,
        with_ce: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The slices, in order: the kernel's terms and logit gradient on each, folded into ``grads``.

        Returns the divergence sum, the CE sum and the statistics' sums (0-d tensors).
        """
        div = self.divergence
        hidden_flat, weight = student
        device = hidden_flat.device
        total_kd = torch.zeros((), dtype=torch.float32, device=device)
        total_ce = torch.zeros((), dtype=torch.float32, device=device)
        stats: dict[str, torch.Tensor] = {}
        inv_tau = 1.0 / div.temperature
        if plan.single_pass or not div.needs_row_stats:
            prepared: list[Any] = [None] * len(plan.picks)
        else:
            # Pass 1 (TAD, rows cut across slices): teacher top-K ids and α_T of every position, then w(X) per
            # row, before any slice's tail term can be weighted.
            items = [div.prepare_chunk(teacher.logits(p), v) for p, v in zip(plan.picks, plan.valid, strict=True)]
            prepared, first_pass_stats = div.finish_prepare_rows(items, plan.row_ids, plan.valid, plan.num_rows)
            add_sums(stats, first_pass_stats)
        slices = zip(plan.picks, plan.row_ids, plan.labels, plan.valid, prepared, strict=True)
        for pick, rows, lab, valid, prep in slices:
            hs = hidden_flat[pick]
            teacher_logits = teacher.logits(pick)
            if plan.single_pass:
                # The slice's rows are complete: w(X) from this slice's own teacher pass, whose log p_T and p_T
                # the divergence pass then reuses.
                item = div.prepare_chunk(teacher_logits, valid, keep=True)
                (prep,), first_pass_stats = div.finish_prepare_rows([item], [rows], [valid], plan.num_rows)
                add_sums(stats, first_pass_stats)
            per_token, ce, grad_logits, chunk_stats = self._step(
                div, hs, weight, student_bias, teacher_logits, lab, valid, prep,
                grads.needed, inv_tau, kd_scale, ce_scale, with_ce,
            )  # fmt: skip
            total_kd = total_kd + per_token.sum()
            total_ce = total_ce + ce
            add_sums(stats, chunk_stats)
            if grads.needed:
                grads.add(pick, hs, grad_logits.to(weight.dtype), weight)
            del grad_logits, per_token, teacher_logits
        return total_kd, total_ce, stats

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, compile_chunk={self.compile_chunk}, skip_ignored={self.skip_ignored}"


def _check_shapes(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    """Raises ValueError naming the shapes when the fused loss's inputs do not fit together."""
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
        raise ValueError(f"student_weight must be [V, D_s={student_hidden.size(2)}], got {tuple(student_weight.shape)}")
    if teacher_weight.dim() != 2 or teacher_weight.size(1) != teacher_hidden.size(2):
        raise ValueError(
            f"teacher_weight must be [V_T, D_t={teacher_hidden.size(2)}], got {tuple(teacher_weight.shape)}"
        )
    if teacher_weight.size(0) < student_weight.size(0):
        raise ValueError(
            f"teacher vocabulary ({teacher_weight.size(0)}) is smaller than the student's ({student_weight.size(0)}); "
            "the teacher's may only extend the student's (its extra rows are cut). Use models with a shared vocabulary."
        )


@dataclass
class _SlicePlan:
    """Which flattened positions each slice holds, and what the loss needs to know about them."""

    picks: list[slice | torch.Tensor]  # per slice: positions of the [B*S] grid
    row_ids: list[torch.Tensor]  # per slice: [N] row (sequence) of each position
    labels: list[torch.Tensor]  # per slice: [N] labels
    valid: list[torch.Tensor]  # per slice: [N] label != ignore_index
    num_valid: torch.Tensor  # 0-d fp32
    num_rows: int
    single_pass: bool  # every slice holds whole rows and the kernel needs row statistics


def _plan_slices(
    labels: torch.Tensor, ignore_index: int, chunk_size: int, skip_ignored: bool, needs_row_stats: bool
) -> _SlicePlan:
    """Slices of at most ``chunk_size`` positions of the ``[B, S]`` labels (only the valid ones when
    ``skip_ignored``), whole rows per slice where every row fits (TAD's one-pass schedule)."""
    batch, seq = labels.shape
    flat_labels = labels.reshape(-1)
    valid_flat = flat_labels != ignore_index
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
    bounds, whole_rows = _slices(counts, chunk_size)
    picks = [slice(a, b) if positions is None else positions[a:b] for a, b in bounds]
    slice_labels = [flat_labels[pick] for pick in picks]
    return _SlicePlan(
        picks=picks,
        row_ids=[row_of[a:b] for a, b in bounds],
        labels=slice_labels,
        valid=[lab != ignore_index for lab in slice_labels],
        num_valid=num_valid,
        num_rows=batch,
        single_pass=needs_row_stats and whole_rows,
    )


class _TeacherProjection:
    """The teacher's logits of any slice, ``[N, V]`` fp32 / τ, projected on demand into scratch buffers."""

    def __init__(
        self,
        div: ChunkKernel,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        vocab: int,
    ):
        self._div = div
        self._hidden = hidden.detach().reshape(-1, hidden.size(2))
        # Cut the teacher's extra vocabulary rows before the matmul: same logits, fewer FLOPs.
        self._weight = weight[:vocab].detach()
        self._bias = bias[:vocab].detach() if bias is not None else None
        self._inv_tau = 1.0 / div.temperature

    def logits(self, pick: slice | torch.Tensor) -> torch.Tensor:
        logits = _project(self._div, "teacher_logits", self._hidden[pick], self._weight, self._bias)
        return logits.mul_(self._inv_tau) if self._inv_tau != 1.0 else logits


class _GradientSums:
    """Gradient assembly: per slice ``∂L/∂H = G W`` (written in place), ``∂L/∂W += Gᵀ H``, ``∂L/∂b += Σ_n G_n``."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, wanted: dict[str, bool], accumulate_fp32: bool):
        self.needed = any(wanted.values())
        acc_dtype = torch.float32 if accumulate_fp32 else weight.dtype
        # Ignored positions keep a zero gradient.
        self.hidden = torch.zeros_like(hidden) if wanted["hidden"] else None
        self._hidden_flat = self.hidden.view(-1, hidden.size(2)) if self.hidden is not None else None
        self.weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if wanted["weight"] else None
        self.bias = torch.zeros(weight.size(0), dtype=acc_dtype, device=weight.device) if wanted["bias"] else None

    def add(self, pick: slice | torch.Tensor, hs: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> None:
        """One slice's logit gradient ``g`` (``[N, V]``, model dtype) with its hidden states ``hs``."""
        if self._hidden_flat is not None:
            self._hidden_flat[pick] = g @ weight
        if self.weight is not None:
            _mm_accumulate(self.weight, g.t(), hs)
        if self.bias is not None:
            self.bias.add_(g.sum(0))

    def result(self, names: list[str], inputs: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
        """The wanted gradients in ``names`` order, each in its input's dtype."""
        out = []
        for name in names:
            grad = getattr(self, name)
            out.append(grad if name == "hidden" else grad.to(inputs[name].dtype))
        return out


def _chunk_step(
    div: ChunkKernel,
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
    """One slice: project, divergence (the divergence's own ``chunk_terms``), optional CE, combined logit gradient.

    Returns the per-token divergence ``[N]``, the CE sum (0-d), the gradient ``[N, V]`` fp32 of the *scaled*
    total loss with respect to the student logits (or None) and the divergence's chunk statistics.
    """
    # Model dtype, exactly what the model's output layer would give; into a reused buffer outside compile.
    logits = _project(div, "student_logits", hs, weight, bias) if div.workspace_open else F.linear(hs, weight, bias)
    student = logits.to(torch.float32)
    ce = torch.zeros((), dtype=torch.float32, device=hs.device)
    ce_grad = None
    if with_ce and inv_tau == 1.0 and div.folds_ce:
        # The divergence adds CE to its own value and gradient from its log p_S (CE is at τ = 1): no extra
        # passes over [N, V].
        res = div.chunk_terms(student, teacher, valid, prepared, need_grad, kd_scale, ce=(labels, ce_scale))
        ce = res.stats.pop("ce_sum")
        return res.per_token, ce, res.grad, res.stats
    if with_ce:
        # CE at temperature 1 on the unscaled logits, by the kernels' own fold helpers: value −log p[label],
        # gradient ce_row·(softmax − one-hot).
        log_p = torch.log_softmax(student, dim=-1)
        ce = fold_ce_value(log_p, valid, labels)
        if need_grad:
            ce_row = torch.where(valid, ce_scale, 0.0)
            ce_grad = log_p.exp_().mul_(ce_row[:, None])
            fold_ce_onehot(ce_grad, valid, labels, ce_row)
        del log_p
    student = student.mul_(inv_tau) if inv_tau != 1.0 else student
    # The divergence folds kd_scale into its gradient (no extra pass over [N, V]); the gradient may be the
    # divergence's scratch buffer, valid until its next chunk: the caller consumes it before then.
    res = div.chunk_terms(student, teacher, valid, prepared, need_grad, kd_scale)
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
    div: ChunkKernel, name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``[N, V]`` fp32 logits ``hidden @ weight.T + bias`` formed in the model's dtype (as ``F.linear``) in the
    divergence's reused scratch buffers: a fresh ``[N, V]`` tensor per slice costs page faults on CPU."""
    n, vocab = hidden.size(0), weight.size(0)
    low_precision = weight.dtype != torch.float32
    out = div.buffer_of(name + "_model_dtype" if low_precision else name, n, vocab, hidden.device, weight.dtype)
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)
    if low_precision:
        out = div.buffer_of(name, n, vocab, hidden.device).copy_(out)
    return out


class _FusedWith(FusedLinearDistillationLoss):
    """A fused loss whose divergence is built from the keyword arguments it does not take itself.

    A subclass names its divergence class (``divergence_class``); its signature is the fused loss's own
    keywords plus that class's (``num_output_chunks`` aside: the fused path has no materialised chunks), so a
    config's ``_component_`` and validation see one flat argument list that cannot drift from the divergence.
    """

    divergence_class: type[ChunkKernel]

    def __init__(
        self,
        *,
        chunk_size: int = 1024,
        compile_chunk: bool = False,
        accumulate_fp32: bool = True,
        compile_backend: str = "inductor",
        skip_ignored: bool | None = None,
        **divergence_args: Any,
    ):
        divergence = self.divergence_class(**divergence_args)
        super().__init__(divergence, chunk_size, compile_chunk, accumulate_fp32, compile_backend, skip_ignored)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [p for p in inspect.signature(_FusedWith.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]
        theirs = [
            p.replace(kind=p.KEYWORD_ONLY)
            for name, p in inspect.signature(cls.divergence_class).parameters.items()
            if name != "num_output_chunks" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        cls.__signature__ = inspect.Signature(theirs + own)


class FusedLinearTADLoss(_FusedWith):
    """TAD (paper Eq. 4-6) from hidden states and output weights: the keyword arguments of :class:`TADLoss`
    plus the fused ones. ``_component_: tad_torchtune.losses.fused_linear.FusedLinearTADLoss`` in a config.

    Example:
        >>> fused = FusedLinearTADLoss(top_k=5, chunk_size=64)
        >>> hs, ws = torch.randn(2, 16, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
        >>> ht, wt = torch.randn(2, 16, 12), torch.randn(50, 12)
        >>> loss = fused(hs, ws, ht, wt, torch.randint(0, 50, (2, 16)))
        >>> loss.backward()
    """

    divergence_class = TADLoss


class FusedLinearForwardKLLoss(_FusedWith):
    """Vanilla KD (forward KL, the paper's baseline) on the same fused machinery: the keyword arguments of
    :class:`ForwardKLLoss` plus the fused ones."""

    divergence_class = ForwardKLLoss


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
