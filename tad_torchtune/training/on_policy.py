"""On-policy distillation for the ``knowledge_distillation_tad`` recipe (the ``on_policy:`` config section).

For prompt/response data (labels masked to the ignore index over the prompt), a fraction λ of micro-batches
replaces each row's reference response with one the student samples from the prompt, as the student is at
that step. The recipe then runs its usual loss step on the new batch: the teacher scores the sampled tokens
and the divergence (``kd_loss``: TAD, forward/reverse KL, JSD, ToDi, ...) plus CE are computed on the
generated positions only (the labels mask everything else), with the same global-token normalisation as
off-policy micro-batches. λ = 0 is the off-policy recipe, λ = 1 fully on-policy: the λ of GKD (Agarwal et al.,
arXiv 2306.13649); reverse KL at λ = 1 is the token-level form of MiniLLM (``docs/on_policy.md``).

Randomness is counter-based, never drawn from the global RNG: whether micro-batch ``j`` of step ``s`` is
on-policy is a hash of ``(seed, s, j)``, and row ``r`` samples with a generator seeded by a hash of
``(seed, s, j, r)``, ``r`` being the row's place in the *global* micro-batch (rank ``k`` of ``W`` holds places
``k, k + W, ...``, the order the distributed sampler deals samples). So a resumed run draws exactly what an
uninterrupted one draws (the state is the step counter, already in the checkpoint), λ = 0 consumes nothing,
and 1 and N processes with the same global batch draw the same samples.

Generation (:func:`generate`) is batched: prompts are left-padded, a boolean mask hides the padding and
per-row position ids keep every prompt's positions from 0; a KV cache (torchtune's ``local_kv_cache``) holds
keys and values, so each new token costs one single-position forward. Under FSDP2 every rank calls the
sharded student the same number of times: the loop stops only when no rank has an unfinished row.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "OnPolicy",
    "OnPolicySettings",
    "fit_problems",
    "generate",
    "on_policy_decision",
    "prompt_lengths",
    "row_seed",
    "settings_problems",
]


@dataclass(frozen=True)
class OnPolicySettings:
    """The ``on_policy:`` section (``docs/recipe.md``, ``docs/on_policy.md``).

    Attributes:
        fraction (float): λ, the probability that a micro-batch is on-policy, in [0, 1]. Default: 0.0
        max_new_tokens (int): tokens the student may generate per row (fewer when it samples a stop token).
            Default: 128
        temperature (float): sampling temperature, > 0 (ignored when ``sample`` is false). Default: 1.0
        top_p (float): nucleus sampling mass in (0, 1]; 1 samples from the whole distribution. Default: 1.0
        sample (bool): sample (true) or decode greedily (false). Default: True
        seed (int | None): seed of the on-policy draws; None uses the run's ``seed``. Default: None
        log_teacher_logprob (bool): log the teacher's mean log-probability of the samples (one extra teacher
            forward without gradient per on-policy micro-batch). Default: True
    """

    fraction: float = 0.0
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    sample: bool = True
    seed: int | None = None
    log_teacher_logprob: bool = True

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> OnPolicySettings:
        """Settings from the config section (None: the defaults, i.e. off).

        Raises:
            ValueError: every problem :func:`settings_problems` finds, in one message.
        """
        problems = settings_problems(node)
        if problems:
            raise ValueError("; ".join(f"on_policy.{k} {m}" for k, m in problems))
        return cls(**dict(node or {}))


def settings_problems(node: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(key, message) for every bad value of the ``on_policy:`` section (empty when it is fine).

    Args:
        node: the section as a mapping (None: absent).

    Returns:
        list[tuple[str, str]]: e.g. ``[("fraction", "must be in [0, 1], got 1.5 ...")]``.
    """
    if node is None:
        return []
    if not isinstance(node, Mapping):
        return [("", f"must be a mapping of {_known()}, got {node!r}")]
    out: list[tuple[str, str]] = []
    known = {f.name for f in fields(OnPolicySettings)}
    for key in node:
        if key not in known:
            out.append((str(key), f"is not an on_policy key (keys: {_known()})"))

    def number(key: str, integer: bool = False) -> float | None:
        value = node.get(key)
        if value is None:
            out.append((key, f"must be {'an integer' if integer else 'a number'}, got null"))
            return None
        kind_ok = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float))
        if not kind_ok or not math.isfinite(float(value)):
            out.append((key, f"must be {'an integer' if integer else 'a finite number'}, got {value!r}"))
            return None
        return float(value)

    fraction = number("fraction") if "fraction" in node else None
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        out.append(("fraction", f"must be in [0, 1] (the share of on-policy micro-batches), got {node['fraction']!r}"))
    n = number("max_new_tokens", integer=True) if "max_new_tokens" in node else None
    if n is not None and n < 1:
        out.append(("max_new_tokens", f"must be >= 1, got {node['max_new_tokens']!r}"))
    sample = node.get("sample", True)
    if not isinstance(sample, bool):
        out.append(("sample", f"must be true or false, got {sample!r}"))
        sample = True
    t = number("temperature") if "temperature" in node else None
    if t is not None and t <= 0 and sample:
        out.append(
            (
                "temperature",
                f"must be > 0 when sampling, got {node['temperature']!r}; for greedy decoding set sample: false",
            )
        )
    p = number("top_p") if "top_p" in node else None
    if p is not None and not 0.0 < p <= 1.0:
        out.append(("top_p", f"must be in (0, 1] (1 = no nucleus cut), got {node['top_p']!r}"))
    if node.get("seed") is not None:
        s = number("seed", integer=True)
        if s is not None and s < 0:
            out.append(("seed", f"must be >= 0 or null (null: the run's seed), got {node['seed']!r}"))
    flag = node.get("log_teacher_logprob", True)
    if not isinstance(flag, bool):
        out.append(("log_teacher_logprob", f"must be true or false, got {flag!r}"))
    return out


def _known() -> str:
    return ", ".join(f.name for f in fields(OnPolicySettings))


# ---------------------------------------------------------------------------------------------------------
# counter-based randomness
def _hash64(*values: int) -> int:
    """A 63-bit integer from a tuple of integers (stable across processes, platforms and Python runs)."""
    data = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"tad-onpolicy").digest(), "little") >> 1


def on_policy_decision(seed: int, step: int, micro: int, fraction: float) -> bool:
    """Whether micro-batch ``micro`` (0-based) of optimizer step ``step`` (1-based) is on-policy.

    A uniform number in [0, 1) from a hash of ``(seed, step, micro)`` compared with ``fraction``: 0 never, 1 always,
    the same answer on every rank and after a resume.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return (_hash64(seed, step, micro, -1) >> 10) / 2.0**53 < fraction


def row_seed(seed: int, step: int, micro: int, global_row: int) -> int:
    """The sampling seed of one row: a hash of ``(seed, step, micro, global_row)``."""
    return _hash64(seed, step, micro, global_row)


# ---------------------------------------------------------------------------------------------------------
# generation
def _last_logits(out: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """``[B, V]`` fp32 logits of the last position from a model output (a tensor or ``tensor_split`` chunks)."""
    if isinstance(out, torch.Tensor):
        return out[:, -1].float()
    return [c for c in out if c.size(1) > 0][-1][:, -1].float()


def _choose(
    logits: torch.Tensor, sample: bool, temperature: float, top_p: float, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Next token per row ``[B]`` from ``[B, V]`` fp32 logits: argmax, or a draw at ``temperature`` from the top-p
    nucleus (the smallest set of most likely tokens whose mass reaches ``top_p``) with each row's generator."""
    if not sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the most likely token always stays).
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


@dataclass
class Generation:
    """What :func:`generate` returns: per row, the sampled tokens ``[n_b]`` (stop token included when sampled),
    the student's log-probability of each at temperature 1 ``[n_b]``, and whether the row ended on a stop token."""

    tokens: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    stopped: list[bool]
    forward_calls: int


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    cache_dtype: torch.dtype | None = None,
    any_active: Callable[[bool], bool] | None = None,
) -> Generation:
    """Batched autoregressive generation from a torchtune ``TransformerDecoder``.

    Prompts are left-padded to the longest; a ``[B, L, L]`` boolean mask (causal, padding hidden) and per-row
    position ids (0 at each prompt's first token) make every row compute what it would alone. With
    ``use_cache`` keys and values live in a KV cache (torchtune ``local_kv_cache``) and each new token is one
    single-position forward; without it every step re-runs the whole sequence (the reference the tests
    compare with). A row stops after a stop token, or early when its logits are not finite (the loss step's
    non-finite guard then sees the same model).

    Args:
        model (nn.Module): the student (caller sets eval mode; no caches set up yet).
        prompts (Sequence[torch.Tensor]): ``B`` 1-D token tensors on the model's device
            (lengths may differ, each >= 1).
        max_new_tokens (int): at most this many tokens per row.
        stop_ids (Sequence[int]): tokens that end a row (included in its output).
        pad_id (int): filler for padding (hidden by the mask; any id the embedding accepts).
        sample (bool): draw (true) or argmax (false). Default: True
        temperature (float): sampling temperature (> 0). Default: 1.0
        top_p (float): nucleus mass in (0, 1]. Default: 1.0
        generators (Sequence[torch.Generator] | None): one per row (reproducible per-row streams); None uses
            the global RNG. Default: None
        use_cache (bool): KV cache (true) or full recomputation (false). Default: True
        cache_dtype (torch.dtype | None): KV cache dtype; None: the model's parameter dtype. Default: None
        any_active (Callable[[bool], bool] | None): given whether this process has an unfinished row, returns
            whether any process has (FSDP2 lock-step: an all-reduce); None: this process alone. Default: None

    Returns:
        Generation: per-row tokens, log-probabilities, stop flags, and the number of forward calls made.
    """
    from torchtune.modules.common_utils import local_kv_cache

    device = prompts[0].device
    b = len(prompts)
    lens = torch.tensor([p.numel() for p in prompts], device=device)
    p_len = int(lens.max())
    total = p_len + max_new_tokens
    pad = p_len - lens  # [B] left padding per row
    tokens = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, int(pad[i]) : p_len] = p
    cols = torch.arange(total, device=device)
    pos = (cols[None, :] - pad[:, None]).clamp_min(0)  # [B, L]
    mask = (
        torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))[None]
        & (cols[None, :] >= pad[:, None])[:, None, :]
    )
    mask |= torch.eye(total, dtype=torch.bool, device=device)[None]  # padding queries see themselves (no empty row)
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    n_gen = torch.zeros(b, dtype=torch.long, device=device)
    logps = torch.zeros(b, max_new_tokens, device=device)
    calls = 0

    def forward(start: int, end: int) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if use_cache:
            out = model(tokens[:, start:end], mask=mask[:, start:end, :], input_pos=pos[:, start:end])
        else:
            out = model(tokens[:, :end], mask=mask[:, :end, :end], input_pos=pos[:, :end])
        return _last_logits(out)

    dtype = cache_dtype or next(model.parameters()).dtype
    ctx = (
        local_kv_cache(model, batch_size=b, device=device, dtype=dtype, decoder_max_seq_len=total)
        if use_cache
        else None
    )
    if ctx is not None:
        ctx.__enter__()
    try:
        for i in range(max_new_tokens):
            cur = p_len + i  # the column this iteration writes
            logits = forward(0, p_len) if i == 0 else forward(cur - 1, cur)
            finite = torch.isfinite(logits).all(-1)
            nxt = _choose(torch.where(finite[:, None], logits, 0.0), sample, temperature, top_p, generators)
            active = ~done & finite
            logps[:, i] = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)
            tokens[:, cur] = torch.where(active, nxt, pad_id)
            n_gen += active.long()
            hit = active & torch.isin(nxt, stop)
            stopped |= hit
            done |= hit | ~finite
            local = not bool(done.all())
            if i + 1 == max_new_tokens or not (any_active(local) if any_active is not None else local):
                break
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    counts = n_gen.tolist()
    return Generation(
        tokens=[tokens[r, p_len : p_len + counts[r]].clone() for r in range(b)],
        logprobs=[logps[r, : counts[r]].clone() for r in range(b)],
        stopped=stopped.tolist(),
        forward_calls=calls,
    )


def prompt_lengths(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Prompt length per row ``[B]`` from next-token ``labels [B, S]``: the first trained label at column ``i``
    predicts token ``i + 1``, so the prompt is tokens ``[0, i]``; a row with no trained label gives 0."""
    valid = labels != ignore_index
    first = valid.int().argmax(dim=1)
    return torch.where(valid.any(dim=1), first + 1, 0)


def assemble(
    prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], pad_id: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded training batch from prompts and generated responses.

    Returns:
        tuple: ``tokens [B, S]`` (prompt, response, padding) and next-token ``labels [B, S]``: the response
        tokens at the columns that predict them (``labels[P - 1 + t] = response[t]``), ignore elsewhere.
    """
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    width = max(s.numel() for s in seqs)
    device = seqs[0].device
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full((len(seqs), width), ignore_index, dtype=torch.long, device=device)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[i, : p.numel() + r.numel()] = seqs[i]
        if r.numel():
            labels[i, p.numel() - 1 : p.numel() - 1 + r.numel()] = r
    return tokens, labels


# ---------------------------------------------------------------------------------------------------------
# the recipe's hook
class OnPolicy:
    """Replaces on-policy micro-batches with student samples and keeps their metrics (one per recipe).

    The recipe calls :meth:`rollout` on a step's prepared micro-batches before counting the step's tokens,
    :meth:`observe` with each micro-batch's loss-step result, and :meth:`step_metrics` once per step.

    Args:
        settings (OnPolicySettings): the ``on_policy:`` section.
        student (nn.Module): the model being trained (its current weights generate).
        teacher (nn.Module | None): scores the samples for the ``teacher_logprob`` metric (None: not logged).
        stop_ids (Sequence[int]): the tokenizer's stop tokens (EOS, end of turn).
        pad_id (int): the tokenizer's padding id.
        ignore_index (int): the label that marks untrained positions.
        seed (int): the run's seed (used when ``settings.seed`` is None).
        max_seq_len (int): the longest sequence both models accept (prompt + generated tokens).
        rank (int): this process's rank. world_size (int): number of processes.
    """

    def __init__(
        self,
        settings: OnPolicySettings,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        stop_ids: Sequence[int],
        pad_id: int,
        ignore_index: int,
        seed: int,
        max_seq_len: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.settings = settings
        self._student, self._teacher = student, teacher if settings.log_teacher_logprob else None
        self._stop_ids, self._pad_id, self._ignore = list(stop_ids), int(pad_id), int(ignore_index)
        self._seed = int(settings.seed if settings.seed is not None else seed)
        self._max_seq_len = int(max_seq_len)
        self._rank, self._world = int(rank), int(world_size)
        self._distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        self._flags: list[bool] = []
        self._observed = 0
        self._reset()

    def _reset(self) -> None:
        self._sums = dict.fromkeys(("micro", "on", "rows", "gen_tokens", "eos", "student_lp", "teacher_lp", "kd"), 0.0)
        self._gen_seconds = 0.0
        self._flags, self._observed = [], 0

    def _any_active(self, local: bool) -> bool:
        if not self._distributed:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=next(self._student.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def rollout(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> list[dict[str, torch.Tensor]]:
        """The step's micro-batches with the on-policy ones replaced (same order).

        Args:
            micro_batches (list[dict]): prepared batches (``tokens [B, S]``, next-token ``labels [B, S]``).
            step (int): the optimizer step being taken (1-based; the counter the draws are keyed on).

        Returns:
            list[dict]: off-policy batches unchanged; on-policy ones as ``{"tokens", "labels"}`` with the student's
            responses after each prompt.
        """
        self._reset()
        out = []
        for j, batch in enumerate(micro_batches):
            on = on_policy_decision(self._seed, step, j, self.settings.fraction)
            self._flags.append(on)
            self._sums["micro"] += 1
            out.append(self._replace(batch, step, j) if on else batch)
        return out

    @torch.no_grad()
    def _replace(self, batch: dict[str, torch.Tensor], step: int, micro: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        tokens, labels = batch["tokens"], batch["labels"]
        lens = prompt_lengths(labels, self._ignore).tolist()
        # A row without a trained label stays empty (nothing to generate for: no prompt boundary).
        keep = [n > 0 for n in lens]
        prompts = [tokens[i, : max(n, 1)] for i, n in enumerate(lens)]
        budget = min(self.settings.max_new_tokens, self._max_seq_len - max(p.numel() for p in prompts))
        if self._distributed:  # one budget on every rank: FSDP2 needs the same number of forwards everywhere
            t = torch.tensor([budget], device=tokens.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            budget = int(t.item())
        if budget < 1:
            raise ValueError(
                f"a prompt of {max(lens)} tokens leaves no room to generate within the models' max_seq_len "
                f"({self._max_seq_len}); lower the data's max_seq_len or on_policy.max_new_tokens"
            )
        device = tokens.device
        gens = []
        for i in range(len(prompts)):
            g = torch.Generator(device=device)
            g.manual_seed(row_seed(self._seed, step, micro, i * self._world + self._rank))
            gens.append(g)
        was_training = self._student.training
        self._student.eval()
        try:
            gen = generate(
                self._student,
                prompts,
                max_new_tokens=budget,
                stop_ids=self._stop_ids,
                pad_id=self._pad_id,
                sample=self.settings.sample,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                generators=gens,
                any_active=self._any_active if self._distributed else None,
            )
        finally:
            self._student.train(was_training)
        responses = [r if k else r[:0] for r, k in zip(gen.tokens, keep, strict=True)]
        new_tokens, new_labels = assemble(prompts, responses, self._pad_id, self._ignore)
        s = self._sums
        s["on"] += 1
        s["rows"] += sum(keep)
        s["gen_tokens"] += sum(r.numel() for r in responses)
        s["eos"] += sum(st for st, k in zip(gen.stopped, keep, strict=True) if k)
        s["student_lp"] += sum(float(lp.sum()) for lp, k in zip(gen.logprobs, keep, strict=True) if k)
        if self._teacher is not None:
            s["teacher_lp"] += self._teacher_logprob_sum(new_tokens, new_labels)
        self._gen_seconds += time.perf_counter() - t0
        return {"tokens": new_tokens, "labels": new_labels}

    def _teacher_logprob_sum(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Σ log p_T(sample) over the generated positions (the teacher's vocabulary cut to the student's, as the
        loss does)."""
        out = self._teacher(tokens)
        chunks = [out] if isinstance(out, torch.Tensor) else [c for c in out if c.size(1) > 0]
        vocab = _vocab_size(self._student)
        total = torch.zeros((), device=tokens.device)
        for c, lab in zip(chunks, labels.split([c.size(1) for c in chunks], dim=1), strict=True):
            valid = lab != self._ignore
            lp = torch.log_softmax(c[..., :vocab].float(), dim=-1).gather(-1, lab.clamp_min(0)[..., None]).squeeze(-1)
            total = total + (lp * valid).sum()
        return float(total)

    def observe(self, result: Mapping[str, Any]) -> None:
        """Takes one micro-batch's loss-step result (in :meth:`rollout`'s order): its divergence sum counts for
        ``on_policy_kd_mean`` when the micro-batch was on-policy."""
        if self._observed < len(self._flags) and self._flags[self._observed]:
            self._sums["kd"] += float(result["kd"])
        self._observed += 1

    def step_metrics(self, device: torch.device) -> dict[str, float]:
        """The step's on-policy metrics, summed over ranks (one all-reduce when distributed).

        Returns:
            dict: ``on_policy_fraction`` (share of the step's micro-batches), ``on_policy_gen_seconds`` (this rank),
            and, when the step had on-policy rows, the per-row ``on_policy_gen_len_mean`` and
            ``on_policy_eos_mean`` (share stopped by a stop token) and the per-generated-token
            ``on_policy_kd_mean``, ``on_policy_student_logprob_mean``, ``on_policy_teacher_logprob_mean``.
        """
        keys = sorted(self._sums)
        vec = torch.tensor([self._sums[k] for k in keys], dtype=torch.float64, device=device)
        if self._distributed:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        s = dict(zip(keys, vec.tolist(), strict=True))
        metrics = {"on_policy_fraction": s["on"] / max(s["micro"], 1.0), "on_policy_gen_seconds": self._gen_seconds}
        if s["rows"] > 0:
            n = max(s["gen_tokens"], 1.0)
            metrics["on_policy_gen_len_mean"] = s["gen_tokens"] / s["rows"]
            metrics["on_policy_eos_mean"] = s["eos"] / s["rows"]
            metrics["on_policy_kd_mean"] = s["kd"] / n
            metrics["on_policy_student_logprob_mean"] = s["student_lp"] / n
            if self._teacher is not None:
                metrics["on_policy_teacher_logprob_mean"] = s["teacher_lp"] / n
        return metrics


def _vocab_size(model: nn.Module) -> int:
    return int(model.tok_embeddings.num_embeddings)


def length_problem(max_new_tokens: int, data_max_seq_len: int, model_max_seq_len: int) -> str | None:
    """Why prompts of up to ``data_max_seq_len - 1`` tokens plus ``max_new_tokens`` would not fit the models (None
    when they fit). A prompt keeps at least one response token within the data's window, hence the ``- 1``."""
    longest = data_max_seq_len - 1 + max_new_tokens
    if longest <= model_max_seq_len:
        return None
    room = model_max_seq_len - (data_max_seq_len - 1)
    fix = f"lower it to <= {room}" if room >= 1 else "lower it"
    return (
        f"is {max_new_tokens}: after a prompt of up to {data_max_seq_len - 1} tokens (the data's max_seq_len "
        f"{data_max_seq_len} - 1) that makes {longest} tokens, past the models' max_seq_len {model_max_seq_len}; "
        f"{fix}, or lower the data's max_seq_len"
    )


def prompt_mask_problem(samples: Sequence[Mapping[str, Any]], ignore_index: int) -> str | None:
    """Why these dataset samples cannot be used on-policy (None when they can): every sample with a trained
    label must start with an ignored one (the prompt), and at least one sample must have a trained label."""
    trained = 0
    for i, sample in enumerate(samples):
        labels = list(sample["labels"])
        if not any(lb != ignore_index for lb in labels):
            continue
        trained += 1
        if labels[0] != ignore_index:
            return (
                f"sample {i} has no prompt mask (its first label is trained, not {ignore_index}): on-policy "
                "distillation needs prompt/response data whose prompt labels are ignored, e.g. "
                "tad_torchtune.data.instruction_dataset or orcamel_dataset with train_on_input: false"
            )
    if samples and trained == 0:
        return f"the first {len(samples)} samples have no trained label: there is no response to replace"
    return None


def fit_problems(
    cfg: Mapping[str, Any],
    *,
    loss_weight: Callable[[str], float],
    models: Mapping[str, nn.Module],
    dataset_parts: Sequence[Any],
    notes: list[str],
) -> list[tuple[str, str]]:
    """Whether the ``on_policy:`` section fits the rest of a recipe config (a start-up check of ``validate``).

    With ``on_policy.fraction`` > 0: no ``teacher_cache`` (samples are new tokens), unpacked data, a divergence
    to grade the samples, prompts + ``max_new_tokens`` within both models' ``max_seq_len``, and prompt-masked
    samples. Run after the section's own values passed :func:`settings_problems`.

    Args:
        cfg (Mapping[str, Any]): the recipe config (a DictConfig).
        loss_weight (Callable[[str], float]): ``"kd_weight"`` -> the divergence's weight as the recipe uses it
            (``kd_ratio`` applied); called only where a check needs it.
        models (Mapping[str, nn.Module]): ``"model"`` / ``"teacher_model"`` as built (meta device is fine), those
            that built.
        dataset_parts (Sequence[Any]): the datasets built for the run (empty when data was not built); their
            first 32 samples each are checked for a prompt mask.
        notes (list[str]): receives what could not be checked before the run.

    Returns:
        list[tuple[str, str]]: (key, message) per problem, e.g. ``("on_policy.fraction", "needs unpacked ...")``.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    node = cfg.get("on_policy")
    if node is None:
        return []
    settings = OnPolicySettings.from_config(node)
    if settings.fraction == 0:
        return []
    if cfg.get("teacher_cache") is not None:
        return [
            (
                "on_policy.fraction",
                "cannot be used with teacher_cache: the student's samples are new tokens no cache holds; set "
                "on_policy.fraction: 0 or remove teacher_cache",
            )
        ]
    ds = cfg.get("dataset")
    nodes = list(ds) if isinstance(ds, ListConfig) else [ds] if ds is not None else []
    if any(isinstance(d, DictConfig) and d.get("packed", False) for d in nodes):
        return [("on_policy.fraction", "needs unpacked data (packed: true puts several prompts in a row)")]
    out: list[tuple[str, str]] = []
    if loss_weight("kd_weight") == 0:
        out.append(
            (
                "on_policy.fraction",
                "needs a divergence to grade the samples; kd_weight is 0 (CE on the "
                "student's own samples teaches nothing new)",
            )
        )
    limits = [getattr(models.get(k), "max_seq_len", None) for k in ("model", "teacher_model")]
    limits = [n for n in limits if isinstance(n, int)]
    data_limits = [OmegaConf.select(cfg, "tokenizer.max_seq_len", default=None)]
    data_limits += [d.get("max_seq_len") for d in nodes if isinstance(d, DictConfig)]
    data_limits = [n for n in data_limits if isinstance(n, int) and n > 0]
    if limits and data_limits:
        problem = length_problem(settings.max_new_tokens, min(data_limits), min(limits))
        if problem is not None:
            out.append(("on_policy.max_new_tokens", problem))
    elif limits:
        notes.append(
            "on_policy: the data sets no max_seq_len, so prompt + max_new_tokens cannot be checked before the "
            "run; generation stops at the models' max_seq_len"
        )
    if dataset_parts:
        loss = cfg.get("loss")
        ignore = int(loss.get("ignore_index", -100)) if isinstance(loss, DictConfig) else -100
        samples = [part[i] for part in dataset_parts for i in range(min(len(part), 32))]
        problem = prompt_mask_problem(samples, ignore)
        if problem is not None:
            out.append(("dataset", problem))
    return out
