"""The three known uninformative dependency messages are dropped; other messages of the same sources still show."""

from __future__ import annotations

import logging
import warnings

import tad_torchtune  # noqa: F401  (installs the filters)
from tad_torchtune._quiet import quiet_git_hash


def test_known_messages_dropped_others_kept(caplog):
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Skipping import of cpp extensions due to incompatible torch version")
        logging.getLogger("torchao").warning("something else from torchao")
        logging.getLogger("lm_eval.api.task").warning("t: Custom kwargs can be passed to `--metadata` in console")
        logging.getLogger("lm_eval.api.task").warning("a real task warning")
    assert [r.getMessage() for r in caplog.records] == ["something else from torchao", "a real task warning"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]


def test_git_hash_outside_a_checkout_is_silent(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator as evaluator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with quiet_git_hash():
        assert evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
    evaluator.get_git_commit_hash()  # the original, for contrast: git's own message reaches stderr
    assert "fatal" in capfd.readouterr().err
