"""Sequence-level knowledge distillation (Seq-KD; Kim & Rush, "Sequence-Level Knowledge Distillation",
arXiv 1606.07947): the teacher writes continuations of prompts once, and the student trains on them with CE
(their Seq-KD) or with CE plus any divergence to the live teacher (their "Seq-KD + Word-KD").

Prompts are ORCAMEL questions (:func:`orcamel_prompts`) or prefixes of the recipe's pretraining windows
(:class:`~tad_torchtune.offline.engine.WindowSource` with ``prefix_len``). The teacher decodes greedily (Kim &
Rush's beam of 1, the common LLM practice) or samples (temperature, top-k) with a seed per prompt: row ``i``
draws from its own generator seeded with ``(seed, i)``, so a continuation depends neither on the batch it
shared nor on the number of processes. Decoding is batched with a KV cache (torchtune ``local_kv_cache``;
prompts left-padded, padding excluded by an explicit mask, never by token value, so a prompt may contain the
pad id) and stops at the tokenizer's stop tokens or after ``max_new_tokens``.

The pass (``tad-tune offline generate``) stores per prompt its tokens and its continuation (int32) and whether
a stop token ended it; :func:`seqkd_dataset` turns the folder into the recipe's dataset: ``tokens = prompt +
continuation``, labels on the continuation only (the prompt is masked, as in SFT).

Cost: one teacher decode per prompt (``max_new_tokens`` sequential steps per batch) and about 4 bytes per
prompt-or-generated token on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tad_torchtune.offline.engine import Batch, load_pass, read_manifest
from tad_torchtune.offline.models import LoadedModel, logits_of

CROSS_ENTROPY_IGNORE_IDX = -100


def _row_generators(indices: Sequence[int], seed: int, device: torch.device) -> list[torch.Generator]:
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        gens.append(g)
    return gens


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, gens: list[torch.Generator] | None
) -> torch.Tensor:
    """Next ids ``[B]`` from fp32 logits ``[B, V]``: argmax when ``temperature == 0``, else a per-row draw."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_k is not None:
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    assert gens is not None
    return torch.stack([torch.multinomial(probs[b], 1, generator=gens[b])[0] for b in range(len(gens))])


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[np.ndarray | Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    vocab_size: int | None = None,
) -> list[tuple[np.ndarray, bool]]:
    """Continue each prompt with the model, batched with a KV cache.

    Args:
        model (torch.nn.Module): a torchtune ``TransformerDecoder`` without caches set up.
        prompts (Sequence): token ids per prompt (non-empty).
        max_new_tokens (int): most tokens generated per prompt.
        stop_ids (Sequence[int]): a generated stop id ends its row (it is kept as the last token).
        temperature (float): 0 decodes greedily (argmax); > 0 samples from ``softmax(logits / temperature)``.
            Default: 0.
        top_k (int | None): sample among the ``top_k`` most likely ids only. Default: None.
        seed (int): sampling seed; row ``j`` uses a generator seeded with ``(seed, indices[j])``. Default: 0.
        indices (Sequence[int] | None): the prompts' global ids (for the per-row seeds). Default: 0..B-1.
        vocab_size (int | None): only ids below it, and the stop ids, are generated (a teacher's padded or extra
            output rows beyond the tokenizer's vocabulary are never picked, but its own end-of-turn token, e.g.
            Phi-3's ``<|end|>`` = 32007 over Llama-2's 32,000 ids, still ends a row). Default: None (all rows).

    Returns:
        Per prompt ``(continuation int64 [n <= max_new_tokens], stopped)``.
    """
    from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
    from torchtune.modules.common_utils import local_kv_cache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    rows = [np.asarray(p, dtype=np.int64) for p in prompts]
    bsz, plen = len(rows), max(len(r) for r in rows)
    total = plen + max_new_tokens
    limit = getattr(model, "max_seq_len", None)
    if limit is not None and total > int(limit):
        raise ValueError(
            f"prompt ({plen} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"max_seq_len {limit}; lower max_new_tokens or max_prompt_tokens"
        )
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    tokens = torch.zeros(bsz, plen, dtype=torch.long)
    real = torch.zeros(bsz, total, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, plen - len(r) :] = torch.from_numpy(r)
        real[b, plen - len(r) :] = True
    tokens, real = tokens.to(device), real.to(device)
    masks = get_causal_mask_from_padding_mask(real, target_seq_len=total)  # [B, total, total]
    positions = get_position_ids_from_padding_mask(real)  # [B, total]
    gens = _row_generators(indices if indices is not None else range(bsz), seed, device) if temperature else None
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.zeros(bsz, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.zeros(bsz, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    with local_kv_cache(model, batch_size=bsz, device=device, dtype=dtype, decoder_max_seq_len=total):
        logits = logits_of(model, tokens, mask=masks[:, :plen], input_pos=positions[:, :plen])[:, -1]
        for step in range(max_new_tokens):
            scores = logits.float()
            if vocab_size is not None and vocab_size < scores.shape[-1]:
                beyond = scores[:, vocab_size:].clone()
                scores[:, vocab_size:] = float("-inf")
                keep = stops[(stops >= vocab_size) & (stops < scores.shape[-1])]
                scores[:, keep] = beyond[:, keep - vocab_size]
            nxt = _pick(scores, temperature, top_k, gens)
            out[:, step] = nxt
            lengths += (~done).long()
            done |= torch.isin(nxt, stops)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            cur = plen + step
            logits = logits_of(
                model, nxt[:, None], mask=masks[:, cur : cur + 1], input_pos=positions[:, cur : cur + 1]
            )[:, -1]
    out_np, len_np = out.cpu().numpy(), lengths.cpu().numpy()
    stop_set = set(int(s) for s in stop_ids)
    results = []
    for b in range(bsz):
        cont = out_np[b, : len_np[b]]
        results.append((cont, bool(cont.size and int(cont[-1]) in stop_set)))
    return results


def stop_ids_of(tokenizer: Any) -> list[int]:
    """The tokenizer's stop tokens (torchtune ``stop_tokens``, e.g. Llama-3's end-of-turn ids) or its EOS."""
    from tad_torchtune.data import tokenizer_tools as tk

    ids = list(getattr(tokenizer, "stop_tokens", None) or [])
    eos = tk.eos_id(tokenizer)
    if eos is not None and eos not in ids:
        ids.append(eos)
    if not ids:
        raise ValueError(f"tokenizer {tk.describe(tokenizer)} has no eos_id or stop_tokens: generation cannot stop")
    return ids


class SeqKDWriter:
    """The pass's writer: per prompt, the prompt and the teacher's continuation.

    Args:
        teacher (LoadedModel): the generating model.
        max_new_tokens (int): most generated tokens per prompt.
        stop_ids (Sequence[int]): stop tokens.
        temperature (float): 0: greedy. Default: 0.
        top_k (int | None): sampling restricted to the top-k ids. Default: None.
        seed (int): sampling seed. Default: 0.
        max_prompt_tokens (int | None): longer prompts keep their last ``max_prompt_tokens`` ids (so a chat
            template's assistant header stays). Default: None (no cut).
        vocab_size (int | None): the tokenizer's vocabulary; ids at or above it are never generated, except
            stop ids, which are stored as ``end_id``. Default: None.
        end_id (int | None): what a stop id beyond ``vocab_size`` is stored as (the tokenizer's EOS), so the
            student's data holds only its own ids. Default: None (the first stop id below ``vocab_size``).
    """

    kind = "seqkd"

    def __init__(
        self,
        teacher: LoadedModel,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        max_prompt_tokens: int | None = None,
        vocab_size: int | None = None,
        end_id: int | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
        self.teacher = teacher
        self.settings = {
            "max_new_tokens": int(max_new_tokens),
            "stop_ids": [int(s) for s in stop_ids],
            "temperature": float(temperature),
            "top_k": top_k,
            "seed": int(seed) if temperature else None,
            "max_prompt_tokens": max_prompt_tokens,
            "vocab_size": vocab_size,
            "end_id": end_id,
        }
        if vocab_size is not None and any(i >= vocab_size for i in self.settings["stop_ids"]):
            inside = [i for i in self.settings["stop_ids"] if i < vocab_size]
            if end_id is None and not inside:
                raise ValueError(
                    f"every stop id {self.settings['stop_ids']} is beyond the vocabulary of {vocab_size}; give "
                    "end_id (the tokenizer's EOS) to store them as"
                )
            self.settings["end_id"] = end_id if end_id is not None else inside[0]

    def identity(self) -> dict[str, Any]:
        return {"teacher": self.teacher.identity(), **self.settings}

    def records(self, batch: Batch) -> dict[str, np.ndarray]:
        s = self.settings
        lengths = batch.lengths.cpu().numpy()
        toks = batch.tokens.cpu().numpy()
        cut = s["max_prompt_tokens"]
        prompts = [toks[b, : lengths[b]][-cut:] if cut else toks[b, : lengths[b]] for b in range(len(lengths))]
        results = generate(
            self.teacher.model,
            prompts,
            max_new_tokens=s["max_new_tokens"],
            stop_ids=s["stop_ids"],
            temperature=s["temperature"],
            top_k=s["top_k"],
            seed=s["seed"] or 0,
            indices=batch.indices.tolist(),
            vocab_size=s["vocab_size"],
        )
        conts = [c for c, _ in results]
        if s["vocab_size"] is not None:  # a stop id beyond the tokenizer's vocabulary ends the row as its EOS
            conts = [np.where(c >= s["vocab_size"], s["end_id"], c) if c.size else c for c in conts]
        plens = np.array([len(p) for p in prompts], dtype=np.int64)
        clens = np.array([len(c) for c in conts], dtype=np.int64)
        return {
            "prompt_tokens": np.concatenate(prompts).astype(np.int32),
            "prompt_lengths": plens,
            "tokens": np.concatenate(conts).astype(np.int32) if clens.sum() else np.zeros(0, np.int32),
            "lengths": clens,
            "stopped": np.array([st for _, st in results], dtype=np.bool_),
            "_tokens": plens + clens,
        }


class ReferenceSplitWriter:
    """A pass writer without a model: each window split into a prompt and the original text that follows it.

    The records are :class:`SeqKDWriter`'s (prompt, continuation, lengths, ``stopped`` always false), so
    :func:`seqkd_dataset` reads the folder the same way: prompt/response items with the reference continuation
    instead of a teacher's (the off-policy data of on-policy distillation, ``docs/on_policy.md``).

    Args:
        prefix_len (int): prompt tokens: the first ``prefix_len`` ids of each instance.
        response_len (int): the next ``response_len`` ids are the response.
    """

    kind = "reference_split"

    def __init__(self, *, prefix_len: int, response_len: int):
        if prefix_len < 1 or response_len < 1:
            raise ValueError(f"prefix_len and response_len must be >= 1, got {prefix_len} and {response_len}")
        self.settings = {"prefix_len": int(prefix_len), "response_len": int(response_len)}

    def identity(self) -> dict[str, Any]:
        return dict(self.settings)

    def records(self, batch: Batch) -> dict[str, np.ndarray]:
        p, r = self.settings["prefix_len"], self.settings["response_len"]
        lengths = batch.lengths.cpu().numpy()
        if int(lengths.min()) < p + r:
            raise ValueError(
                f"an instance has {int(lengths.min())} ids, fewer than prefix_len + response_len = {p + r}"
            )
        toks = batch.tokens.cpu().numpy()
        b = len(lengths)
        return {
            "prompt_tokens": toks[:, :p].reshape(-1).astype(np.int32),
            "prompt_lengths": np.full(b, p, dtype=np.int64),
            "tokens": toks[:, p : p + r].reshape(-1).astype(np.int32),
            "lengths": np.full(b, r, dtype=np.int64),
            "stopped": np.zeros(b, dtype=np.bool_),
            "_tokens": np.full(b, p + r, dtype=np.int64),
        }


def orcamel_prompts(
    tokenizer: Any,
    sources: Sequence[tuple[str | Path, str, str]],
    *,
    prompt_template: Any = None,
    max_examples: int | None = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Tokenised questions of ORCAMEL-style sources, each ending where the answer would start.

    The prompt of a question is the longest common prefix of the tokenisations of ``(question, "A")`` and
    ``(question, "B")`` as the recipe's :func:`~tad_torchtune.data.orcamel.tokenize_example` builds them: the
    tokenizer's template, the question and the assistant header (``<|im_start|>assistant\\n``, ``Answer:``),
    exactly what the student sees before the answer in SFT.

    Args:
        tokenizer: the run's tokenizer.
        sources: ``(source, question_column, answer_column)`` triples, e.g.
            ``(orca_dir, "question", "answer")`` and ``(camel_dir, "message_1", "message_2")``.
        prompt_template: see :class:`~tad_torchtune.data.orcamel.InstructionDataset`. Default: None.
        max_examples (int | None): rows per source. Default: None.

    Returns:
        (prompts, description for the manifest).
    """
    from tad_torchtune.data.orcamel import build_prompt_template, read_pairs, tokenize_example

    template = build_prompt_template(prompt_template)
    if template is None and getattr(tokenizer, "prompt_template", None) is None:
        template = build_prompt_template("qa")
    prompts: list[list[int]] = []
    for source, qcol, acol in sources:
        for q, _ in read_pairs(source, qcol, acol, max_examples=max_examples):
            a, _ = tokenize_example(tokenizer, q, "A", template)
            b, _ = tokenize_example(tokenizer, q, "B", template)
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            prompts.append(list(a[:n]))
    desc = {
        "orcamel": [[str(s), q, a] for s, q, a in sources],
        "prompt_template": str(prompt_template),
        "max_examples": max_examples,
    }
    return prompts, desc


class SeqKDDataset(Dataset):
    """A Seq-KD pass folder as the recipe's dataset: ``{"tokens": prompt + continuation, "labels": ...}``.

    Also reads a :class:`ReferenceSplitWriter` pass (the same records, the original text as continuation).

    Labels are unshifted (``shifted_labels = False``, the SFT convention; the recipe shifts them) and masked
    (``-100``) on the prompt unless ``train_on_prompt``. Examples longer than ``max_seq_len`` are cut; those
    whose continuation is empty (or cut away) are dropped.

    Args:
        path (str | Path): a complete ``seqkd`` pass (``tad-tune offline generate``) or ``reference_split`` pass.
        max_seq_len (int): longest example. Default: 2048.
        train_on_prompt (bool): also take the loss on prompt tokens. Default: False.
    """

    shifted_labels = False

    def __init__(self, path: str | Path, max_seq_len: int = 2048, train_on_prompt: bool = False):
        manifest = read_manifest(path)
        if manifest["identity"]["writer"] not in (SeqKDWriter.kind, ReferenceSplitWriter.kind):
            raise ValueError(
                f"{path} holds a {manifest['identity']['writer']!r} pass, not Seq-KD generations or reference "
                "prompt/response splits"
            )
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.manifest = manifest
        data = load_pass(path)
        order = np.argsort(data["index"], kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            raise ValueError(f"{path}: shards out of order")
        p_off = np.concatenate([[0], np.cumsum(data["prompt_lengths"])])
        c_off = np.concatenate([[0], np.cumsum(data["lengths"])])
        self._p, self._c = data["prompt_tokens"], data["tokens"]
        keep = []
        for i in range(len(data["lengths"])):
            plen = int(data["prompt_lengths"][i])
            trainable = int(data["lengths"][i]) > 0 and (train_on_prompt or plen < max_seq_len)
            if trainable:
                keep.append((int(p_off[i]), int(p_off[i + 1]), int(c_off[i]), int(c_off[i + 1])))
        if not keep:
            raise ValueError(f"{path}: no example with a non-empty continuation within max_seq_len={max_seq_len}")
        self._rows = keep
        self.num_dropped = len(data["lengths"]) - len(keep)
        self.max_seq_len = int(max_seq_len)
        self.train_on_prompt = bool(train_on_prompt)

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.manifest["identity"]["source"].get("tokenizer")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        a, b, c, d = self._rows[index]
        prompt, cont = self._p[a:b].astype(np.int64), self._c[c:d].astype(np.int64)
        tokens = np.concatenate([prompt, cont])[: self.max_seq_len]
        labels = tokens.copy()
        if not self.train_on_prompt:
            labels[: len(prompt)] = CROSS_ENTROPY_IGNORE_IDX
        return {"tokens": tokens.tolist(), "labels": labels.tolist()}


def seqkd_dataset(
    tokenizer: Any = None,
    *,
    path: str | Path,
    max_seq_len: int = 2048,
    train_on_prompt: bool = False,
    check_tokenizer: bool = True,
) -> SeqKDDataset:
    """YAML builder: ``dataset: {_component_: tad_torchtune.offline.seqkd_dataset, path: seqkd_out/}``.

    Args:
        tokenizer: the run's tokenizer (checked against the one that made the prompts), or None.
        path (str | Path): the Seq-KD pass folder.
        max_seq_len (int): longest example. Default: 2048.
        train_on_prompt (bool): loss on prompt tokens too. Default: False.
        check_tokenizer (bool): refuse a pass made with another tokenizer. Default: True.
    """
    ds = SeqKDDataset(path, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt)
    made_with = ds.tokenizer_fingerprint
    if tokenizer is not None and check_tokenizer and made_with is not None:
        from tad_torchtune.data import tokenizer_tools as tk

        if tk.fingerprint(tokenizer) != made_with:
            raise ValueError(
                f"Seq-KD data {path} was generated from prompts of another tokenizer than the run's "
                f"{tk.describe(tokenizer)}; generate again with the run's tokenizer or pass check_tokenizer=False"
            )
    return ds
