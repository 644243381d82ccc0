"""Runs the recipe with the crash tests' hooks installed: ``python -m tests.reliability.fault_runner --config ...``.

Test-side only. The hooks are read from this process's environment by this file (never by ``tad_torchtune``):

- ``TEST_FAULT_INJECT="<point>:<step>[@<rank>][,...]"``: SIGKILL this process when it reaches ``point`` at global
  step ``step`` (on every rank, or only on ``rank``); points are ``tad_torchtune.reliability.fault.POINTS``.
- ``TEST_TRACE_BATCHES=<file>``: append one JSON line per optimizer step and rank,
  ``{"step", "rank", "windows": [sha1 of each micro-batch's tokens]}``.

SIGKILL is what an OOM killer, a preempted node or ``kill -9`` does: no ``finally``, no ``atexit``, no flush.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import signal
import sys
from typing import Any

from tad_torchtune.reliability.fault import POINTS, set_fault_hook, set_trace_hook

FAULT_ENV = "TEST_FAULT_INJECT"
TRACE_ENV = "TEST_TRACE_BATCHES"


def parse_fault_spec(spec: str) -> list[tuple[str, int, int | None]]:
    """``"mid_step:3@1,after_rename:4"`` -> ``[("mid_step", 3, 1), ("after_rename", 4, None)]``."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, rest = item.split(":", 1)
        step_s, _, rank_s = rest.partition("@")
        if point not in POINTS:
            raise ValueError(f"{FAULT_ENV} point {point!r} is not one of {POINTS}")
        out.append((point, int(step_s), int(rank_s) if rank_s else None))
    return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def install(fault_spec: str | None, trace_path: str | None) -> None:
    """Installs the SIGKILL and trace hooks described by the two settings (either may be None)."""
    if fault_spec:
        kills = parse_fault_spec(fault_spec)

        def kill_at(point: str, step: int) -> None:
            if any(p == point and s == step and (r is None or r == _rank()) for p, s, r in kills):
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        set_fault_hook(kill_at)
    if trace_path:

        def trace(step: int, micro_batches: list[dict[str, Any]]) -> None:
            windows = [hashlib.sha1(b["tokens"].cpu().numpy().tobytes()).hexdigest()[:16] for b in micro_batches]
            with open(trace_path, "a") as f:
                f.write(json.dumps({"step": step, "rank": _rank(), "windows": windows}) + "\n")

        set_trace_hook(trace)


if __name__ == "__main__":
    install(os.environ.get(FAULT_ENV), os.environ.get(TRACE_ENV))
    sys.argv[0] = "kd_tad"
    runpy.run_module("tad_torchtune.recipes.kd_tad", run_name="__main__", alter_sys=True)
