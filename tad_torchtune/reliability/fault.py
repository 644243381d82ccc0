"""Hooks for the crash tests: named points where a test may kill the process, and a per-step data trace.

Production code only *announces* these moments; nothing happens unless a test installed a hook in the
process first (:func:`set_fault_hook`, :func:`set_trace_hook`). No environment variable is read here, so a
production run can never be made to kill itself. The crash tests install their hooks from a small runner
(``tests/reliability/fault_runner.py``) that then starts the recipe as ``tune run`` would.

Points (``POINTS``), each with the global step it belongs to:

- ``mid_step``: step ``step`` has run forward and backward on every micro-batch, the optimizer has not stepped.
- ``mid_checkpoint``: the step-``step`` checkpoint's first file is written into its temporary folder.
- ``before_rename``: every file and the manifest are written, the temporary folder is not yet renamed.
- ``after_rename``: the checkpoint is in place, older checkpoints are not yet pruned.
- ``mid_prune``: an old checkpoint is renamed aside for deletion, not yet deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

POINTS = ("mid_step", "mid_checkpoint", "before_rename", "after_rename", "mid_prune")

FaultHook = Callable[[str, int], None]
TraceHook = Callable[[int, list[dict[str, Any]]], None]
_fault_hook: FaultHook | None = None
_trace_hook: TraceHook | None = None


def set_fault_hook(hook: FaultHook | None) -> FaultHook | None:
    """Installs ``hook(point, step)`` (None removes it); returns the previous hook. Tests only."""
    global _fault_hook
    previous, _fault_hook = _fault_hook, hook
    return previous


def set_trace_hook(hook: TraceHook | None) -> TraceHook | None:
    """Installs ``hook(step, micro_batches)`` called once per optimizer step (None removes it). Tests only."""
    global _trace_hook
    previous, _trace_hook = _trace_hook, hook
    return previous


def fault_point(point: str, step: int) -> None:
    """Announces that this process reached ``point`` at global ``step`` (a no-op unless a test hooked it)."""
    if _fault_hook is not None:
        _fault_hook(point, step)


def trace_step(step: int, micro_batches: list[dict[str, Any]]) -> None:
    """Announces the micro-batches of optimizer step ``step`` (a no-op unless a test hooked it)."""
    if _trace_hook is not None:
        _trace_hook(step, micro_batches)
