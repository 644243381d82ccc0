"""The demo's text: the Python Language Reference that CPython ships in ``pydoc_data``.

Why this text. The demo must run offline on a fresh machine and must not copy third-party text into the
repository. ``pydoc_data/topics.py`` is part of CPython's standard library (it backs ``help("assert")``):
about 80 sections, roughly 460,000 characters (about 110,000 SmolLM2 tokens) of edited English prose
with code examples, under the PSF license, present wherever Python is. The alternatives weighed:

* docstrings of installed packages: present too, but short, fragmented and dominated by parameter lists;
* text the teacher writes itself (sequence-level KD): generating ~10^4 tokens with a 135M model on two CPU
  cores takes longer than the whole demo budget, and the student would learn the teacher's greedy modes;
* WikiText or books: not on the machine without a download.

The held-out split is by section (every ``holdout_every``-th section name in sorted order), so no held-out
paragraph shares a document with training text. Documents are joined with the tokenizer's
``<|endoftext|>`` id, as in SmolLM2's pretraining, and the stream is cut into fixed-length sequences.
"""

from __future__ import annotations

import importlib

import torch
from torch.utils.data import Dataset


def reference_documents() -> dict[str, str]:
    """``{topic: text}`` from CPython's ``pydoc_data.topics``.

    Raises:
        RuntimeError: if this Python was installed without ``pydoc_data`` (some minimal distro packages).
    """
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError as err:  # e.g. Debian's python3-minimal without libpython3-stdlib
        raise RuntimeError(
            "the demo's text is the Python Language Reference in the standard library's `pydoc_data` module, "
            "which this Python lacks; install your distribution's full Python standard library "
            "(e.g. `apt-get install libpython3-stdlib`)"
        ) from err
    return {name: text.strip() for name, text in sorted(topics.items()) if text.strip()}


def split_documents(docs: dict[str, str], holdout_every: int = 8) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split by document: every ``holdout_every``-th name (sorted) is held out.

    Returns:
        tuple[list[str], list[str]]: training texts and held-out texts.
    """
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2 (1 would hold out everything), got {holdout_every}")
    names = sorted(docs)
    train = [docs[n] for i, n in enumerate(names) if i % holdout_every != holdout_every // 2]
    held = [docs[n] for i, n in enumerate(names) if i % holdout_every == holdout_every // 2]
    return train, held


def token_stream(texts: list[str], tokenizer, separator_id: int) -> list[int]:
    """Concatenate tokenized documents, each followed by ``separator_id``."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_bos=False, add_eos=False))
        ids.append(separator_id)
    return ids


def pack(ids: list[int], seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Cut a token stream into ``[N, seq_len + 1]`` windows with stride ``seq_len`` (the remainder is dropped).

    Window ``i`` is ``ids[i*seq_len : i*seq_len + seq_len + 1]``: the model reads its first ``seq_len`` ids and
    predicts its last ``seq_len``, so every token after the first is a target exactly once.

    Raises:
        ValueError: if the stream is shorter than one window.
    """
    n = (len(ids) - 1) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n <= 0:
        raise ValueError(f"a token stream of {len(ids)} tokens cannot fill one window of {seq_len} + 1")
    stream = torch.tensor(ids[: n * seq_len + 1], dtype=torch.long)
    return stream.unfold(0, seq_len + 1, seq_len)  # [N, seq_len + 1]


def split_stream(tokenizer, split: str, holdout_every: int) -> list[int]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    train_docs, held_docs = split_documents(reference_documents(), holdout_every)
    sep = getattr(tokenizer, "endoftext_id", tokenizer.eos_id)
    return token_stream(train_docs if split == "train" else held_docs, tokenizer, sep)


class DemoTextDataset(Dataset):
    """Fixed-length windows of the reference documentation; items ``{"tokens", "labels"}`` (lists of ``seq_len``).

    Labels are already shifted (``labels[t] = tokens[t + 1]``), which ``shifted_labels = True`` tells the
    ``knowledge_distillation_tad`` recipe (the convention of :class:`tad_torchtune.data.PackedTokenDataset`).

    Args:
        windows (torch.Tensor): ``[N, seq_len + 1]`` token windows (see :func:`pack`).
    """

    shifted_labels = True

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        row = self.windows[index].tolist()
        return {"tokens": row[:-1], "labels": row[1:]}


def demo_text_dataset(
    tokenizer,
    split: str = "train",
    seq_len: int = 128,
    max_sequences: int | None = None,
    holdout_every: int = 8,
) -> DemoTextDataset:
    """Dataset builder for the recipe config (``dataset._component_: tad_torchtune.demo.text.demo_text_dataset``).

    Args:
        tokenizer: the run's tokenizer (``encode`` and ``endoftext_id`` / ``eos_id``).
        split (str): ``"train"`` or ``"heldout"``. Default: "train"
        seq_len (int): tokens per window seen by the model. Default: 128
        max_sequences (int | None): keep only the first windows. Default: None (all)
        holdout_every (int): every ``holdout_every``-th section is held out. Default: 8

    Returns:
        DemoTextDataset: windows of the chosen split.
    """
    return DemoTextDataset(pack(split_stream(tokenizer, split, holdout_every), seq_len, max_sequences))


def heldout_batches(
    tokenizer, seq_len: int, num_sequences: int, batch_size: int, holdout_every: int = 8
) -> list[dict[str, torch.Tensor]]:
    """The held-out text as batches ``{"tokens": [B, S], "labels": [B, S]}`` (labels shifted) for evaluation.

    Raises:
        ValueError: if the held-out text has fewer than ``num_sequences`` windows of ``seq_len``.
    """
    windows = pack(split_stream(tokenizer, "heldout", holdout_every), seq_len, num_sequences)
    if windows.shape[0] < num_sequences:
        raise ValueError(
            f"the held-out text has only {windows.shape[0]} windows of {seq_len} tokens; "
            "ask for fewer held-out sequences or shorter ones"
        )
    return [
        {"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()} for w in windows.split(batch_size, dim=0)
    ]


# The second held-out domain: English docstrings of standard-library modules, present wherever Python is. They
# differ from the Language Reference in register (API descriptions and parameter lists, not a specification).
DOCSTRING_MODULES: tuple[str, ...] = (
    "argparse", "collections", "csv", "datetime", "decimal", "difflib", "email.message", "fractions",
    "functools", "heapq", "http.client", "inspect", "json", "logging", "pathlib", "pickle", "random",
    "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "unittest.case",
    "urllib.parse", "zipfile",
)  # fmt: skip


def docstring_documents(modules: tuple[str, ...] = DOCSTRING_MODULES) -> list[str]:
    """One document per module: its docstring and those of its public classes, functions and methods.

    Only objects defined in the module itself are taken (no re-exports), in name order, so the text is fixed
    for a given Python version. Modules this Python lacks are skipped.
    """
    import inspect

    docs = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                parts.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    for mname, member in sorted(vars(obj).items()):
                        if not mname.startswith("_") and inspect.isfunction(member):
                            parts.append(inspect.getdoc(member) or "")
        text = "\n\n".join(p.strip() for p in parts if p and p.strip())
        if text:
            docs.append(text)
    return docs
