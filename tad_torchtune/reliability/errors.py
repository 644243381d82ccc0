"""One clear line instead of a traceback: how every ``tad-tune`` command and the recipe end on a refused input.

A refused input (a bad value, a missing file, a folder in use, a non-finite number) ends the process with one
message saying what, the value and the fix, and a non-zero exit code. The traceback is still there for whoever
needs it: ``--debug`` on the command line or ``TAD_DEBUG=1`` in the environment re-raises the exception.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "TAD_DEBUG"
DEBUG_FLAG = "--debug"
# Exit codes: 1 a refused input (the message says what to change), 3 an unexpected error (a bug: please report).
EXIT_REFUSED = 1
EXIT_INTERNAL = 3
_HINT = f"(add {DEBUG_FLAG} or set {DEBUG_ENV}=1 for the traceback)"


def _refusal_types() -> tuple[type[BaseException], ...]:
    from tad_torchtune.checkpoint.safe_load import UnsafeCheckpointError
    from tad_torchtune.reliability.guards import NonFiniteError
    from tad_torchtune.reliability.run_identity import LauncherGoneError, RunLockError

    # ValueError covers ConfigValidationError and torchtune's ConfigError; OSError covers missing files/folders.
    return ValueError, OSError, NonFiniteError, RunLockError, LauncherGoneError, UnsafeCheckpointError


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether tracebacks were asked for, ``argv`` without ``--debug``)."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    return debug, [a for a in argv if a != DEBUG_FLAG]


def describe(err: BaseException) -> tuple[str, int]:
    """The one message for ``err`` and its exit code.

    A refusal keeps its own message (its first line when several: validation lists each problem on its own line,
    which stays); anything else is named as an unexpected error with its type.
    """
    failures = getattr(err, "failures", None)
    if type(err).__name__ == "ChildFailedError" and isinstance(failures, dict) and failures:
        # torchrun's agent: the workers already printed their one message; say only how they ended.
        codes = sorted({int(getattr(f, "exitcode", -1)) for f in failures.values()})
        own = {c for c in codes if c > 0}  # negative: a signal, e.g. the agent's SIGTERM to the other workers
        if own == {EXIT_REFUSED}:
            return "a worker refused the input (its message is above); torchrun stopped the others", EXIT_REFUSED
        return f"worker process(es) exited with code(s) {codes}; their output is above", EXIT_INTERNAL
    text = str(err).strip() or repr(err)
    if isinstance(err, StopIteration) or not isinstance(err, _refusal_types()):
        first = text.splitlines()[0] if text else ""
        return f"unexpected error {type(err).__name__}: {first} {_HINT}", EXIT_INTERNAL
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return f"{text} {_HINT}" if "\n" not in text else f"{text}\n{_HINT}", EXIT_REFUSED


def run_reporting(fn: Callable[[], int | None], prog: str, debug: bool) -> int:
    """Calls ``fn``; an exception becomes one message on stderr and an exit code (re-raised when ``debug``)."""
    try:
        return int(fn() or 0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if debug:
            raise
        message, code = describe(err)
        print(f"{prog}: {message}", file=sys.stderr)
        return code
