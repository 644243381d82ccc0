"""ORCAMEL's sources are explicit: an unset or missing one is refused at once (no hub retries) with the key to
set, and the "N examples, K truncated" summary reaches a real run's output."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from tad_torchtune.data import orcamel_dataset
from tad_torchtune.data.byte_tokenizer import ByteTokenizer
from tad_torchtune.testing.tiny import tiny_config, write_tiny_assets


@pytest.fixture
def orca(tmp_path):
    path = tmp_path / "orca.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}. " * (1 + i % 9)} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unset_source_names_the_key_and_null(orca):
    with pytest.raises(ValueError, match=r"dataset\.camel_source is not set.*`camel_source: null`"):
        orcamel_dataset(ByteTokenizer(), orca_source=orca)
    with pytest.raises(ValueError, match=r"dataset\.orca_source is not set"):
        orcamel_dataset(ByteTokenizer(), camel_source=None)


def test_missing_local_path_fails_before_any_network(tmp_path, orca):
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"dataset\.camel_source=.*no such file or folder"):
        orcamel_dataset(ByteTokenizer(), orca_source=orca, camel_source=str(tmp_path / "camel-math"))
    with pytest.raises(FileNotFoundError, match=r"dataset\.orca_source="):
        orcamel_dataset(ByteTokenizer(), orca_source="data/orca.parquet", camel_source=None)
    assert time.perf_counter() - t0 < 5  # the old hub default retried for ~25 s


def test_local_only_with_null_builds(orca):
    ds = orcamel_dataset(ByteTokenizer(), orca_source=orca, camel_source=None, max_seq_len=40)
    assert len(ds) == 30 and ds.num_truncated > 0


@pytest.mark.integration_test
def test_summary_is_in_the_run_output(tmp_path, orca):
    assets = write_tiny_assets(tmp_path / "assets")
    cfg = tiny_config(assets, tmp_path / "run", max_steps_per_epoch=1, save_every_n_steps=None)
    cfg.dataset = {"_component_": "tad_torchtune.data.orcamel_dataset", "orca_source": str(orca),
                   "camel_source": None, "max_seq_len": 40}  # fmt: skip
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "tad_torchtune.cli", "run", "tad_torchtune.recipes.kd_tad"]
    proc = subprocess.run(cmd + ["--config", str(tmp_path / "cfg.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = orcamel_dataset(ByteTokenizer(max_seq_len=48), orca_source=orca, camel_source=None, max_seq_len=40)
    assert f"instruction data: 30 examples ({{'{orca}': 30}}), {ds.num_truncated} truncated to 40" in proc.stderr
