"""Small helpers the start-up checks of several subjects share (``tad-tune validate``, :mod:`tad_torchtune.validate`).

Each subject keeps its own check beside it (checkpoints in :mod:`tad_torchtune.checkpoint.checks`, models in
:mod:`tad_torchtune.models.checks`, ...) and returns ``(key, message)`` pairs; these helpers give those messages
one shape. This module imports nothing of ours, so any package may use it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Collection
from typing import Any


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and its last non-empty line (no traceback), at most 400 characters."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if len(lines) == 1 else (lines[-1] if lines else '')}"[:400]


def suggest(key: str, valid: Collection[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid spelling of ``key``, or ``""`` when none is close."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def component_default(node: Any, arg: str) -> Any:
    """``node[arg]``, else the default of argument ``arg`` of ``node``'s ``_component_`` (None when unknown).

    Args:
        node (Any): a config node with a ``_component_`` (a DictConfig), or None.
        arg (str): the argument's name, e.g. ``"top_k"``.

    Returns:
        Any: the value the built component will use, or None (no node, no such argument, no default, or the
        component cannot be imported).
    """
    if node is None:
        return None
    if arg in node:
        return node[arg]
    try:
        from torchtune.config._utils import _get_component_from_path

        p = inspect.signature(_get_component_from_path(str(node["_component_"]))).parameters.get(arg)
        return None if p is None or p.default is inspect.Parameter.empty else p.default
    except Exception:
        return None


def model_vocab(model: Any) -> int | None:
    """The number of token ids ``model`` embeds (``tok_embeddings.num_embeddings``), or None when it has none.

    Works on models built on the meta device (no weights needed).
    """
    emb = getattr(model, "tok_embeddings", None)
    n = getattr(emb, "num_embeddings", None)
    return int(n) if n is not None else None
