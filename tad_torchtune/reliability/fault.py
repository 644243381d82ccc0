"""Deterministic fault injection and data-window tracing for the crash tests (off unless an env var is set).

``TAD_FAULT_INJECT="<point>:<step>[@<rank>][,...]"`` makes the process ``SIGKILL`` itself when it reaches
``point`` at global step ``step`` (on every rank, or only on ``rank``). Points:

- ``mid_step``: step ``step`` has run forward and backward on every micro-batch, the optimizer has not stepped.
- ``mid_checkpoint``: the step-``step`` checkpoint's first file is written into its temporary folder.
- ``before_rename``: every file and the manifest are written, the temporary folder is not yet renamed.
- ``after_rename``: the checkpoint is in place, older checkpoints are not yet pruned.

``TAD_TRACE_BATCHES=<file>`` appends one JSON line per optimizer step and rank:
``{"step", "rank", "windows": [sha1 of each micro-batch's tokens]}`` so a test can prove that no data window
is seen twice or skipped across a crash and a resume.

SIGKILL is what an OOM killer, a preempted node or ``kill -9`` does: no ``finally``, no ``atexit``, no flush.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from typing import Any

FAULT_ENV = "TAD_FAULT_INJECT"
TRACE_ENV = "TAD_TRACE_BATCHES"
POINTS = ("mid_step", "mid_checkpoint", "before_rename", "after_rename")


def parse_fault_spec(spec: str) -> list[tuple[str, int, int | None]]:
    """``"mid_step:3@1,after_rename:4"`` -> ``[("mid_step", 3, 1), ("after_rename", 4, None)]``.

    Raises:
        ValueError: an unknown point or a malformed entry (the message names it).
    """
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            point, rest = item.split(":", 1)
            step_s, _, rank_s = rest.partition("@")
            entry = (point, int(step_s), int(rank_s) if rank_s else None)
        except ValueError:
            raise ValueError(f"{FAULT_ENV} entry {item!r} is not '<point>:<step>[@<rank>]'") from None
        if point not in POINTS:
            raise ValueError(f"{FAULT_ENV} point {point!r} is not one of {POINTS}")
        out.append(entry)
    return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fault_point(point: str, step: int) -> None:
    """SIGKILLs this process if ``TAD_FAULT_INJECT`` names ``point`` at ``step`` (for this rank)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank = _rank()
    for p, s, r in parse_fault_spec(spec):
        if p == point and s == step and (r is None or r == rank):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def trace_step(step: int, micro_batches: list[dict[str, Any]]) -> None:
    """Appends the step's data-window hashes to ``TAD_TRACE_BATCHES`` (no-op when unset)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    windows = [hashlib.sha1(b["tokens"].detach().cpu().numpy().tobytes()).hexdigest()[:16] for b in micro_batches]
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "rank": _rank(), "windows": windows}) + "\n")
