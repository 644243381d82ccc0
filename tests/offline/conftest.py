"""Fixtures for the offline pass: tiny random teacher/reference models and a token file made from their corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from tad_torchtune.testing.tiny import tiny_config, write_tiny_assets

L = 16  # window length of the tests


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Tiny assets plus ``data/train.bin``: the 64-line corpus tokenised with the byte tokenizer."""
    from tad_torchtune.data import write_token_file
    from tad_torchtune.data.byte_tokenizer import byte_tokenizer

    root = write_tiny_assets(tmp_path_factory.mktemp("offline_assets"), seed=0, num_lines=200)
    write_token_file(
        root / "data" / "train.bin", byte_tokenizer(), root / "data" / "train.jsonl", num_workers=0, progress=False
    )
    return root


@pytest.fixture(scope="session")
def models(tiny):
    """(teacher, reference) LoadedModels in fp32 on the CPU: the tiny teacher and the tiny student."""
    from tad_torchtune.offline.models import load_model

    cfg = tiny_config(tiny, tiny / "unused_out")
    teacher = load_model(cfg, "teacher_model", "teacher_checkpointer", device="cpu", dtype="fp32")
    ref = load_model(cfg, "model", "checkpointer", device="cpu", dtype="fp32")
    return teacher, ref
