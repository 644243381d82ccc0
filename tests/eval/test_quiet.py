"""The three known uninformative dependency messages are dropped; other messages of the same sources still show."""

from __future__ import annotations

import logging
import subprocess
import sys

import tad_torchtune  # noqa: F401  (installs the filters)
from tad_torchtune._quiet import quiet_git_hash


def test_known_messages_dropped_others_kept():
    # A handler on each logger itself sees exactly what that logger's filters let through, whatever other code in
    # this process (the entry point, lm-eval's own logging set-up in an earlier test) did to levels, propagation
    # or the root's handlers.
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("torchao", "lm_eval.api.task")]
    saved = [(lg, lg.level, lg.propagate, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
        lg.propagate, lg.disabled = False, False
    try:
        logging.getLogger("torchao").warning("Skipping import of cpp extensions due to incompatible torch version")
        logging.getLogger("torchao").warning("something else from torchao")
        logging.getLogger("lm_eval.api.task").warning("t: Custom kwargs can be passed to `--metadata` in console")
        logging.getLogger("lm_eval.api.task").warning("a real task warning")
    finally:
        for lg, level, propagate, disabled in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
    assert seen == ["something else from torchao", "a real task warning"]


def test_a_fresh_process_prints_neither_torchao_nor_set_vital_message():
    """As a user's run: import tad_torchtune, then torchtune (torchao) and a StatefulDataLoader warning."""
    code = (
        "import warnings, tad_torchtune, torchtune, torchao\n"
        "warnings.warn(\"'set_vital' is deprecated, please do not call\", UserWarning)\n"
        "warnings.warn('another warning', UserWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "another warning" in proc.stderr
    assert "set_vital" not in proc.stderr and "Skipping import of cpp extensions" not in proc.stderr


def test_git_hash_outside_a_checkout_is_silent(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator as evaluator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with quiet_git_hash():
        assert evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
    evaluator.get_git_commit_hash()  # the original, for contrast: git's own message reaches stderr
    assert "fatal" in capfd.readouterr().err
