"""One config loader for every command (tad_torchtune/config_loader.py)."""

import subprocess
import sys

import pytest

from tad_torchtune.config_loader import find_config, load_config


def test_shipped_names_paths_and_overrides(tmp_path):
    shipped = find_config("tiny_cpu")
    assert shipped == find_config("tiny_cpu.yaml") and shipped.is_file()
    cfg = load_config("tiny_cpu", ["batch_size=3", "optimizer.lr=0", "~max_steps_per_epoch"])
    assert cfg.batch_size == 3 and cfg.optimizer.lr == 0 and isinstance(cfg.optimizer.lr, int)
    assert "max_steps_per_epoch" not in cfg
    own = tmp_path / "c.yaml"
    own.write_text("batch_size: 1\n")
    assert load_config(own, ["batch_size=2"]).batch_size == 2


def test_refusals_name_the_value():
    with pytest.raises(FileNotFoundError, match="'no_such_config' is neither a file nor a shipped config name"):
        load_config("no_such_config")
    with pytest.raises(ValueError, match=r"\['batch_size'\] are not key=value"):
        load_config("tiny_cpu", ["batch_size"])


@pytest.mark.parametrize(
    "command",
    [
        ["validate", "--config", "no_such_config"],
        ["plan", "--config", "no_such_config"],
        ["init-student", "--config", "no_such_config", "--out", "unused"],
    ],
)
def test_every_command_refuses_a_missing_config_in_one_line(command, tmp_path):
    """validate, plan and init-student share the loader: a missing config is one line naming it, exit 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "tad_torchtune.cli", *command],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "no_such_config" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "unused").exists()
