"""The three known uninformative dependency messages are dropped; other messages of the same sources still show."""

from __future__ import annotations

import logging
import subprocess
import sys

import tad_torchtune  # noqa: F401  (installs the filters)
from tad_torchtune._quiet import quiet_git_hash


def test_known_messages_dropped_others_kept(caplog):
    # Other code in this process (`tad-tune`'s entry point, lm-eval's own logging set-up when an earlier test ran
    # an evaluation) may have changed these loggers' level or propagation; the filter is what is tested here.
    names = ("torchao", "lm_eval", "lm_eval.api", "lm_eval.api.task")
    saved = [(lg, lg.level, lg.propagate, lg.disabled) for lg in map(logging.getLogger, names)]
    for lg, *_ in saved:
        lg.setLevel(logging.NOTSET)
        lg.propagate, lg.disabled = True, False
    try:
        with caplog.at_level(logging.WARNING):
            logging.getLogger("torchao").warning("Skipping import of cpp extensions due to incompatible torch version")
            logging.getLogger("torchao").warning("something else from torchao")
            logging.getLogger("lm_eval.api.task").warning("t: Custom kwargs can be passed to `--metadata` in console")
            logging.getLogger("lm_eval.api.task").warning("a real task warning")
    finally:
        for lg, level, propagate, disabled in saved:
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
    assert [r.getMessage() for r in caplog.records] == ["something else from torchao", "a real task warning"]


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
