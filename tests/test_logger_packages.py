"""A metric logger whose package is missing is reported by validation (so by `tad-tune validate` and the recipe's
start-up check) before any compute, naming the extra to install; pyproject declares the extras."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tad_torchtune.testing.tiny import tiny_config, write_tiny_assets
from tad_torchtune.validate import ConfigValidationError, logger_package_problems, validate_or_raise

REPO = Path(__file__).resolve().parents[1]
TB = "torchtune.training.metric_logging.TensorBoardLogger"


def _pretend_missing(monkeypatch, missing: set[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))


@pytest.mark.parametrize(
    ("component", "module", "extra"),
    [(TB, "tensorboard", "tad_torchtune[tensorboard]"),
     ("torchtune.training.metric_logging.WandBLogger", "wandb", "tad_torchtune[wandb]")],
)  # fmt: skip
def test_missing_logger_package_named_with_its_extra(tmp_path, monkeypatch, component, module, extra):
    cfg = tiny_config(tmp_path, tmp_path / "run", **{"metric_logger._component_": component})
    _pretend_missing(monkeypatch, {module})
    (problem,) = logger_package_problems(cfg)
    assert problem.key == "metric_logger._component_"
    assert f"needs the `{module}` package" in problem.message and extra in problem.message
    _pretend_missing(monkeypatch, set())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # installed
    assert logger_package_problems(cfg) == []


def test_recipe_start_up_check_refuses_before_compute(tmp_path, monkeypatch):
    assets = write_tiny_assets(tmp_path / "a")
    cfg = tiny_config(assets, tmp_path / "run", **{"metric_logger._component_": TB})
    _pretend_missing(monkeypatch, {"tensorboard"})
    with pytest.raises(ConfigValidationError, match="tensorboard"):
        validate_or_raise(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pyproject_declares_the_logger_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    assert any(r.startswith("wandb") for r in extras["wandb"])
