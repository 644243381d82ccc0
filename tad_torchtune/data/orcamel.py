"""ORCAMEL: the paper's stage-2 instruction set (Orca-Math 200k + CAMEL math 50k), prompt-masked.

``microsoft/orca-math-word-problems-200k`` has ``question`` / ``answer`` columns and ``camel-ai/math`` has
``message_1`` (the problem) / ``message_2`` (GPT-4's answer). Each row becomes a user message (masked) and an
assistant message (trained), is formatted with the student's prompt template and tokenised with torchtune's
``tokenize_messages`` (so BOS, template text and the question carry label -100 and only the answer tokens and
the final EOS are trained), then truncated to ``max_seq_len`` (2048 in the paper) with the number of
truncated examples logged and kept in ``num_truncated``.

All rows are tokenised once at construction (about 250k rows: a few minutes on 2 cores, ~0.5 GB), which
is what lets the builder report truncation up front and makes ``__getitem__`` O(1). Items follow torchtune
0.6.1's SFT convention: ``{"tokens", "labels"}`` **unshifted** (``shifted_labels = False``); the recipe shifts.
With ``packed=True`` the dataset is wrapped in torchtune's ``PackedDataset`` (set ``packed: True`` in the
dataset config so the recipe uses ``padded_collate_packed``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchtune.utils import get_logger

from tad_torchtune.data import tokenizer_tools as tk
from tad_torchtune.data.token_file import data_ext, open_source, resolve_files

# torchtune's logger: the recipe sets it to INFO, so the data summary appears in the run's output.
log = get_logger()

CROSS_ENTROPY_IGNORE_IDX = -100
ORCA_MATH = "microsoft/orca-math-word-problems-200k"
CAMEL_MATH = "camel-ai/math"


class QuestionAnswerFormat:
    """Default prompt format for students without a chat template (TinyLlama base): ``Question: {q}\nAnswer: ``.

    Unlike torchtune's ``PromptTemplate``, which keeps the prefix, the question and the suffix as three
    separately encoded pieces (SentencePiece then adds stray ``▁`` tokens between them), the prompt is one
    string, so the tokens equal a direct encoding of ``"Question: {q}\nAnswer: {a}"`` (what an evaluation
    harness sends) for SentencePiece tokenizers.
    """

    def __init__(self, prefix: str = "Question: ", suffix: str = "\nAnswer: "):
        self.prefix, self.suffix = prefix, suffix

    def __call__(self, messages: list[Any], inference: bool = False) -> list[Any]:
        from torchtune.data import Message

        return [
            Message(role=m.role, content=f"{self.prefix}{m.text_content}{self.suffix}", masked=m.masked)
            if m.role == "user"
            else m
            for m in messages
        ]


def build_prompt_template(template: Any) -> Any | None:
    """A torchtune ``PromptTemplate`` from a YAML-friendly value.

    Args:
        template: ``"qa"`` (``Question: ...\\nAnswer: ``), a dict ``{role: [prepend, append]}``, a dotted
            torchtune template name (``torchtune.data.ChatMLTemplate``), a callable, or None.
    """
    from torchtune.data import PromptTemplate

    if template is None or callable(template):
        return template
    if template == "qa":
        return QuestionAnswerFormat()
    if isinstance(template, Mapping):
        return PromptTemplate(template={k: tuple(v) for k, v in template.items()})
    if isinstance(template, str) and "." in template:
        from torchtune.config._utils import _get_component_from_path

        obj = _get_component_from_path(template)
        return obj() if isinstance(obj, type) else obj
    raise ValueError(
        f"prompt_template={template!r} not understood: use 'qa', a dict {{role: [prepend, append]}}, "
        "a dotted torchtune template name, or null for the tokenizer's own template"
    )


_WORKER: dict[str, Any] = {}


def _init(tokenizer: Any, template: Any, train_on_input: bool, max_seq_len: int) -> None:
    _WORKER.update(tokenizer=tokenizer, template=template, train_on_input=train_on_input, max_seq_len=max_seq_len)


def tokenize_example(
    tokenizer: Any, prompt: str, answer: str, template: Any | None = None, train_on_input: bool = False
) -> tuple[list[int], list[bool]]:
    """Tokenise one (prompt, answer) pair: ``(tokens, mask)`` with ``mask[t] = True`` where no loss is taken.

    Uses the tokenizer's ``tokenize_messages`` (torchtune ``ModelTokenizer``: its own template and special
    tokens apply); tokenizers without it (HF dirs) get ``[BOS] template(prompt)`` masked + ``answer [EOS]``,
    taken from the direct encoding of the whole text where the prompt's tokens are a prefix of it.
    """
    from torchtune.data import Message

    messages = [
        Message(role="user", content=prompt, masked=not train_on_input),
        Message(role="assistant", content=answer, masked=False),
    ]
    if template is not None:
        messages = template(messages)
    if hasattr(tokenizer, "tokenize_messages"):
        tokens, mask = tokenizer.tokenize_messages(messages)
        return list(tokens), list(mask)
    bos, eos = tk.bos_id(tokenizer), tk.eos_id(tokenizer)
    prompt_text, answer_text = messages[0].text_content, messages[1].text_content
    # Prefer the direct encoding of prompt + answer, split where the prompt's own encoding ends (with or
    # without its trailing space); only when the boundary merges tokens encode the two parts separately.
    full = tk.encode_plain(tokenizer, prompt_text + answer_text)
    for candidate in (prompt_text, prompt_text.rstrip(" ")):
        p = tk.encode_plain(tokenizer, candidate)
        if full[: len(p)] == p:
            a = full[len(p) :]
            break
    else:
        p, a = tk.encode_plain(tokenizer, prompt_text), tk.encode_plain(tokenizer, answer_text)
    p = ([bos] if bos is not None else []) + p
    a = a + ([eos] if eos is not None else [])
    return p + a, [not train_on_input] * len(p) + [False] * len(a)


def _tokenize_chunk(pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Tokenise, cut to max_seq_len and pack a chunk of examples into flat arrays (compact to return and keep:
    5 bytes per token instead of ~45 for Python lists).

    Returns:
        (tokens int32 [T], mask bool [T], lengths int64 [n_kept], num_truncated, num_dropped)
    """
    w = _WORKER
    limit = w["max_seq_len"]
    toks, masks, lengths = [], [], []
    truncated = dropped = 0
    for q, a in pairs:
        tokens, mask = tokenize_example(w["tokenizer"], q, a, w["template"], w["train_on_input"])
        if len(tokens) > limit:
            truncated += 1
            tokens, mask = tokens[:limit], mask[:limit]
        if all(mask):  # nothing left to train on
            dropped += 1
            continue
        toks += tokens
        masks += mask
        lengths.append(len(tokens))
    return (
        np.asarray(toks, dtype=np.int32),
        np.asarray(masks, dtype=bool),
        np.asarray(lengths, dtype=np.int64),
        truncated,
        dropped,
    )


def _json_rows(path: str) -> Iterator[dict[str, Any]]:
    """Rows of a ``.json`` / ``.jsonl`` file: a list of objects, one object (CAMEL's one-file-per-example
    layout), a dict of columns, or JSON lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from (json.loads(line) for line in text.splitlines() if line.strip())
        return
    if isinstance(data, list):
        yield from data
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        keys = list(data)
        yield from (dict(zip(keys, vals, strict=True)) for vals in zip(*data.values(), strict=True))
    elif isinstance(data, dict):
        yield data
    else:
        raise ValueError(f"{path}: expected JSON objects, got {type(data).__name__}")


def _row_batches(source: Any, split: str) -> Iterator[dict[str, list[Any]]]:
    """Column batches from local JSON files (read directly: one-object files are common) or HF ``datasets``."""
    files = resolve_files(source)
    if files and all(data_ext(f) in (".json", ".jsonl") and Path(f).suffix in (".json", ".jsonl") for f in files):
        rows: list[dict[str, Any]] = []
        for f in files:
            for row in _json_rows(f):
                rows.append(row)
                if len(rows) == 1024:
                    yield {k: [r.get(k) for r in rows] for k in rows[0]}
                    rows = []
        if rows:
            yield {k: [r.get(k) for r in rows] for k in rows[0]}
        return
    ds, _ = open_source(source, split=split)
    yield from ds.iter(batch_size=1024)


def read_pairs(
    source: str | Path | Sequence[str | Path],
    prompt_column: str,
    answer_column: str,
    split: str = "train",
    max_examples: int | None = None,
) -> list[tuple[str, str]]:
    """(prompt, answer) strings from local file(s) / a folder / a hub id (columns checked, rows with an empty
    side dropped). Local ``.json``/``.jsonl`` files are parsed directly (lists, single objects or JSON lines);
    other formats and hub ids go through HF ``datasets``."""
    pairs: list[tuple[str, str]] = []
    for batch in _row_batches(source, split):
        for col in (prompt_column, answer_column):
            if col not in batch:
                raise KeyError(f"{source}: column {col!r} not found; columns are {sorted(batch)}")
        for q, a in zip(batch[prompt_column], batch[answer_column], strict=True):
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                pairs.append((q, a))
            if max_examples is not None and len(pairs) >= max_examples:
                return pairs
    return pairs


class InstructionDataset(Dataset):
    """Prompt-masked (prompt, answer) examples, tokenised once and held as flat arrays.

    Args:
        tokenizer: the student's torchtune ``ModelTokenizer`` (or an HF tokenizer).
        sources (Sequence[Mapping]): ``[{"source": path or hub id, "prompt_column": ..., "answer_column": ...,
            "split": "train" (optional), "max_examples": int (optional)}]``, concatenated in order.
        max_seq_len (int): longer examples are cut to this many tokens (or to the tokenizer's own
            ``max_seq_len`` when that is shorter). Default: 2048.
        prompt_template: None uses the tokenizer's own template (its ``prompt_template``) or, when it has
            none, ``"qa"`` (``Question: ...\\nAnswer: ``); see :func:`build_prompt_template`. Default: None.
        train_on_input (bool): also train on prompt tokens. Default: False (the paper masks them).
        num_workers (int): tokeniser processes. Default: 1.

    Attributes:
        num_truncated (int): examples cut to ``max_seq_len``.
        num_dropped (int): examples dropped because nothing trainable was left after the cut.
    """

    shifted_labels = False

    def __init__(
        self,
        tokenizer: Any,
        sources: Sequence[Mapping[str, Any]],
        *,
        max_seq_len: int = 2048,
        prompt_template: Any = None,
        train_on_input: bool = False,
        num_workers: int = 1,
    ):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        own = getattr(tokenizer, "prompt_template", None)
        if prompt_template is not None and own is not None:
            raise ValueError(
                f"prompt_template={prompt_template!r} given but tokenizer {tk.describe(tokenizer)} already applies "
                f"{type(own).__name__}; set `prompt_template: null` on one of them"
            )
        if prompt_template is None and own is None:
            prompt_template = "qa"
        template = build_prompt_template(prompt_template)
        # A torchtune tokenizer's own max_seq_len would cut examples inside tokenize_messages, unseen by the
        # truncation count below: the shorter of the two limits applies, and the cut happens here.
        tok_limit = getattr(tokenizer, "max_seq_len", None)
        self.max_seq_len = int(min(max_seq_len, tok_limit) if isinstance(tok_limit, int) else max_seq_len)
        pairs: list[tuple[str, str]] = []
        self.source_sizes: dict[str, int] = {}
        for spec in sources:
            missing = {"source", "prompt_column", "answer_column"} - set(spec)
            if missing:
                raise ValueError(f"source spec {dict(spec)} lacks {sorted(missing)}")
            got = read_pairs(
                spec["source"],
                spec["prompt_column"],
                spec["answer_column"],
                split=spec.get("split", "train"),
                max_examples=spec.get("max_examples"),
            )
            self.source_sizes[str(spec["source"])] = len(got)
            pairs += got
        if not pairs:
            raise ValueError(f"no (prompt, answer) rows found in {list(sources)}")

        chunks = [pairs[i : i + 512] for i in range(0, len(pairs), 512)]
        del pairs
        if tok_limit is not None:
            tokenizer.max_seq_len = None
        args = (tokenizer, template, train_on_input, self.max_seq_len)
        try:
            if num_workers > 1:
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with ctx.Pool(num_workers, initializer=_init, initargs=args) as pool:
                    parts = list(pool.imap(_tokenize_chunk, chunks))
            else:
                _init(*args)
                parts = [_tokenize_chunk(chunk) for chunk in chunks]
        finally:
            if tok_limit is not None:
                tokenizer.max_seq_len = tok_limit
        self.num_truncated = sum(p[3] for p in parts)
        self.num_dropped = sum(p[4] for p in parts)
        lengths = np.concatenate([p[2] for p in parts])
        if lengths.size == 0:
            raise ValueError(
                f"all {self.num_dropped} examples were dropped: their prompts alone fill "
                f"max_seq_len={self.max_seq_len} "
                "tokens; raise max_seq_len (and the tokenizer's max_seq_len)"
            )
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._tokens = np.concatenate([p[0] for p in parts])
        self._mask = np.concatenate([p[1] for p in parts])
        del parts
        log.info(
            "instruction data: %d examples (%s), %d truncated to %d tokens, %d dropped (prompt fills the window), "
            "%d tokens, %d trained",
            len(self),
            self.source_sizes,
            self.num_truncated,
            self.max_seq_len,
            self.num_dropped,
            self._tokens.size,
            int((~self._mask).sum()),
        )

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        a, b = self._offsets[index], self._offsets[index + 1]
        tokens = self._tokens[a:b].astype(np.int64)
        labels = np.where(self._mask[a:b], CROSS_ENTROPY_IGNORE_IDX, tokens)
        return {"tokens": tokens.tolist(), "labels": labels.tolist()}


def instruction_dataset(
    tokenizer: Any,
    *,
    sources: Sequence[Mapping[str, Any]],
    max_seq_len: int = 2048,
    prompt_template: Any = None,
    train_on_input: bool = False,
    packed: bool = False,
    num_workers: int = 1,
) -> Dataset:
    """YAML builder for any (prompt, answer) columns; see :class:`InstructionDataset`. ``packed`` wraps the
    result in torchtune's ``PackedDataset`` (``padding_idx`` = the tokenizer's pad id)."""
    ds = InstructionDataset(
        tokenizer,
        sources,
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
        train_on_input=train_on_input,
        num_workers=num_workers,
    )
    if not packed:
        return ds
    from torchtune.datasets import PackedDataset

    pad = getattr(tokenizer, "pad_id", None)
    return PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=pad if isinstance(pad, int) and pad >= 0 else 0)


class _Unset:
    """Default of ORCAMEL's source keys: they must be given (a path, a hub id, or null to leave one out)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()
_SOURCE_HELP = {
    "orca_source": (
        "Orca-Math (question/answer): a local file or folder, e.g. the hub copy's "
        "data/train-00000-of-00001.parquet, or the hub id 'microsoft/orca-math-word-problems-200k' to download it"
    ),
    "camel_source": (
        "CAMEL math (message_1/message_2): a local folder of the unzipped camel-ai/math JSON files, "
        "or the hub id 'camel-ai/math' to download it"
    ),
}


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    data_file = parts[-1].lower().endswith((".json", ".jsonl", ".parquet", ".txt", ".csv", ".gz", ".zip", ".arrow"))
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and "*" not in value and not data_file


def check_source(key: str, value: Any) -> None:
    """Refuse an unset or missing ORCAMEL source with one message that names ``dataset.<key>`` and the fix.

    A local path that does not exist fails here, before any network access; a hub id (``org/name``) is the
    user's explicit choice to download.
    """
    if value is UNSET:
        raise ValueError(
            f"dataset.{key} is not set: give {_SOURCE_HELP[key]}; or `{key}: null` to train without it "
            "(nothing is downloaded unless a hub id is given)"
        )
    if value is None:
        return
    items = [value] if isinstance(value, str | Path) else list(value)
    for item in items:
        text = str(item)
        if Path(text).expanduser().exists() or _glob_matches(text):
            continue
        if isinstance(item, str) and _looks_like_hub_id(text) and len(items) == 1:
            continue
        raise FileNotFoundError(
            f"dataset.{key}={text!r}: no such file or folder; give {_SOURCE_HELP[key]}, or `{key}: null`"
        )


def _glob_matches(pattern: str) -> bool:
    import glob

    return any(ch in pattern for ch in "*?[") and bool(glob.glob(pattern))


def orcamel_dataset(
    tokenizer: Any,
    *,
    orca_source: str | Path | Sequence[str | Path] | None = UNSET,
    camel_source: str | Path | Sequence[str | Path] | None = UNSET,
    max_seq_len: int = 2048,
    prompt_template: Any = None,
    train_on_input: bool = False,
    packed: bool = False,
    num_workers: int = 1,
    max_examples: int | None = None,
) -> Dataset:
    """ORCAMEL for the recipe: ``dataset: {_component_: tad_torchtune.data.orcamel_dataset, orca_source: ...}``.

    Both sources must be given (nothing is downloaded unless a hub id is given); an unset or missing one is
    refused with a message naming ``dataset.orca_source`` / ``dataset.camel_source``.

    Args:
        tokenizer: the student's tokenizer (passed by the recipe's ``config.instantiate(cfg.dataset, tokenizer)``).
        orca_source: local file(s)/folder with ``question`` / ``answer``, the hub id
            ``microsoft/orca-math-word-problems-200k``, or None to leave Orca-Math out. Required.
        camel_source: local file(s)/folder with ``message_1`` / ``message_2`` (the hub copy of ``camel-ai/math``
            is a zip of JSON files: unzip it and pass the folder), the hub id, or None to leave it out. Required.
        max_seq_len (int): truncation length. Default: 2048.
        prompt_template: see :class:`InstructionDataset`. Default: None.
        train_on_input (bool): Default: False.
        packed (bool): pack with torchtune's ``PackedDataset``. Default: False.
        num_workers (int): tokeniser processes. Default: 1.
        max_examples (int | None): rows per source (quick runs). Default: None.
    """
    check_source("orca_source", orca_source)
    check_source("camel_source", camel_source)
    sources = []
    if orca_source is not None:
        sources.append(
            {
                "source": orca_source,
                "prompt_column": "question",
                "answer_column": "answer",
                "max_examples": max_examples,
            }
        )
    if camel_source is not None:
        sources.append(
            {
                "source": camel_source,
                "prompt_column": "message_1",
                "answer_column": "message_2",
                "max_examples": max_examples,
            }
        )
    if not sources:
        raise ValueError("dataset.orca_source and dataset.camel_source are both null: give at least one")
    return instruction_dataset(
        tokenizer,
        sources=sources,
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
        train_on_input=train_on_input,
        packed=packed,
        num_workers=num_workers,
    )
