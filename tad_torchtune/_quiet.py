"""Messages from our dependencies that tell a tad_torchtune user nothing, filtered where they arise.

Each filter matches one known message, so every other warning of the same library still shows:

* torchao 0.15 logs "Skipping import of cpp extensions ..." at import when its C++ kernels do not match the
  installed torch; torchtune (and we) use none of them.
* torchdata 0.11's ``StatefulDataLoader`` warns "'set_vital' is deprecated" for every loader it builds (once
  per rank), about a call inside torchdata itself.
* lm-eval 0.4.13 warns "Custom kwargs can be passed to `--metadata`" once per task whose data comes from a
  Python function (all our offline tasks), and its git-hash lookup lets ``git describe`` print
  "fatal: not a git repository" outside a checkout (:func:`quiet_git_hash`).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import warnings
from collections.abc import Iterator

__all__ = ["install", "quiet_git_hash"]


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self._starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self._starts)


_INSTALLED = False


def install() -> None:
    """Add the filters (idempotent). Called when ``tad_torchtune`` is imported."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    logging.getLogger("torchao").addFilter(_DropMessages("Skipping import of cpp extensions"))
    logging.getLogger("lm_eval.api.task").addFilter(_DropMessages("Custom kwargs can be passed to `--metadata`"))
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def _git_hash_quietly() -> str | None:
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)  # noqa: S607
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        import os

        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def quiet_git_hash() -> Iterator[None]:
    """Inside, ``lm_eval.simple_evaluate`` records the same git hash without ``git``'s stderr."""
    import lm_eval.evaluator as evaluator

    before = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash_quietly
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = before
