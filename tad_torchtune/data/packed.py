"""Fixed-length pretraining windows over token files, by memory map.

Window ``i`` of a file is ``tokens[i * L : i * L + L + 1]`` with ``L = max_seq_len``: the model reads the first
``L`` ids and is trained to predict the last ``L``. The stride is ``L``, so each token after the first is a
target exactly once per epoch; the tail shorter than a full window is dropped. Documents are separated by
EOS (and BOS) inside a window, as in standard pretraining; attention is not masked across them.

The dataset is map-style, deterministic and cheap: ``__len__`` and ``__getitem__`` are O(1) and nothing is
read at start-up, so sharding, seeded shuffling and the data position all come from the recipe's
``StatefulDistributedSampler`` + ``StatefulDataLoader`` (torchdata), whose ``state_dict`` is saved in the
recipe checkpoint and restores the position exactly.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from tad_torchtune.data import tokenizer_tools as tk
from tad_torchtune.data.token_file import read_meta

log = logging.getLogger(__name__)


class PackedTokenDataset(Dataset):
    """Windows of ``max_seq_len + 1`` tokens over one or more token files (see the module docstring).

    Items are ``{"tokens": list[int] (len L), "labels": list[int] (len L)}`` with ``labels[t] = tokens[t + 1]``
    in the file, i.e. labels are **already shifted** (``shifted_labels = True``): the recipe must not shift
    them again. Lists of ints work with torchtune's ``padded_collate_sft``.

    Args:
        path (str | Path | Sequence): token file(s) written by :func:`write_token_file` (``.bin``).
        max_seq_len (int): tokens the model sees per window (``L``).
        max_tokens (int | float | None): use only the first ``max_tokens`` tokens of the concatenated
            files (rounded down to whole windows), e.g. ``2e9``. Default: None (all).

    Raises:
        ValueError: ``max_seq_len`` < 1 or a file shorter than one window.
    """

    shifted_labels = True

    def __init__(
        self, path: str | Path | Sequence[str | Path], max_seq_len: int, max_tokens: int | float | None = None
    ):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        paths = [path] if isinstance(path, str | Path) else list(path)
        if not paths:
            raise ValueError("path is empty: give at least one token file")
        self.paths = [Path(p).with_suffix(".bin") for p in paths]
        self.metas = [read_meta(p) for p in self.paths]
        self.max_seq_len = int(max_seq_len)
        budget = None if max_tokens is None else int(max_tokens)
        counts = []
        for p, meta in zip(self.paths, self.metas, strict=True):
            n = max(0, (meta["num_tokens"] - 1) // self.max_seq_len)
            if budget is not None:
                n = min(n, max(0, budget // self.max_seq_len))
                budget -= n * self.max_seq_len
            if n == 0 and (budget is None or budget > 0):
                log.warning("%s has %d tokens: no full window of %d + 1", p, meta["num_tokens"], max_seq_len)
            counts.append(n)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        if self._starts[-1] == 0:
            raise ValueError(
                f"no window of max_seq_len={max_seq_len} + 1 tokens in {[str(p) for p in self.paths]} "
                f"({[m['num_tokens'] for m in self.metas]} tokens); lower max_seq_len or tokenise more text"
            )
        self._maps: list[np.memmap] | None = None

    # Memmaps are opened lazily in each process and never pickled (pickling a memmap copies the data).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [
                np.memmap(p, dtype=np.dtype(m["dtype"]), mode="r", shape=(m["num_tokens"],))
                for p, m in zip(self.paths, self.metas, strict=True)
            ]
        return self._maps

    @property
    def num_tokens(self) -> int:
        """Target tokens per epoch (``len(self) * max_seq_len``)."""
        return len(self) * self.max_seq_len

    def __len__(self) -> int:
        return self._starts[-1]

    def window(self, index: int) -> np.ndarray:
        """The ``max_seq_len + 1`` ids of window ``index`` as int64 ``[L + 1]``."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"window {index} out of range for {n} windows")
        f = bisect.bisect_right(self._starts, index) - 1
        start = (index - self._starts[f]) * self.max_seq_len
        return np.asarray(self._open()[f][start : start + self.max_seq_len + 1], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        w = self.window(index)
        return {"tokens": w[:-1].tolist(), "labels": w[1:].tolist()}


def packed_token_dataset(
    tokenizer: Any = None,
    *,
    path: str | Path | Sequence[str | Path],
    max_seq_len: int,
    max_tokens: int | float | None = None,
    check_tokenizer: bool = True,
) -> PackedTokenDataset:
    """YAML builder of :class:`PackedTokenDataset`, used as ``dataset._component_``.

    ``dataset: {_component_: tad_torchtune.data.packed_token_dataset, path: owm.bin, max_seq_len: 2048}``

    The recipe calls ``config.instantiate(cfg.dataset, tokenizer)``; the tokenizer is only used to check that
    the file was made with a tokenizer that splits text the same way (probe fingerprint) and that every id in
    the file is inside its vocabulary.

    Args:
        tokenizer: the run's (student's) tokenizer, or None to skip the check.
        path: token file(s) (``.bin``) written by ``tad-tune tokenize``.
        max_seq_len (int): window length seen by the model (2048 in the paper).
        max_tokens (int | float | None): cap on tokens used (``2e9``). Default: None.
        check_tokenizer (bool): run the checks above. Default: True.

    Raises:
        ValueError: the file does not match the tokenizer (message names both and the fix).
    """
    ds = PackedTokenDataset(path, max_seq_len=max_seq_len, max_tokens=max_tokens)
    if tokenizer is not None and check_tokenizer:
        check_token_file_tokenizer(ds.metas, ds.paths, tokenizer)
    return ds


def check_token_file_tokenizer(metas: list[dict[str, Any]], paths: list[Path], tokenizer: Any) -> None:
    """Raise when a token file was written with a tokenizer that does not match ``tokenizer``."""
    vocab = tk.vocab_size(tokenizer)
    fp = tk.fingerprint(tokenizer)
    eos = tk.eos_id(tokenizer)
    for p, meta in zip(paths, metas, strict=True):
        made_with = meta["tokenizer"]["name"]
        if meta["tokenizer"]["fingerprint"] != fp:
            raise ValueError(
                f"token file {p} was written with {made_with}, which splits text differently from the run's "
                f"tokenizer {tk.describe(tokenizer)}; re-tokenise with the run's tokenizer or pass "
                "check_tokenizer=False if you are sure"
            )
        if meta.get("max_id", -1) >= vocab:
            raise ValueError(
                f"token file {p} (written with {made_with}) contains id {meta['max_id']} but the run's tokenizer "
                f"{tk.describe(tokenizer)} has {vocab} ids; re-tokenise with the student's tokenizer"
            )
        if eos is not None and meta["eos_id"] != eos:
            log.warning(
                "token file %s separates documents with id %s but %s uses eos_id %s",
                p,
                meta["eos_id"],
                tk.describe(tokenizer),
                eos,
            )
