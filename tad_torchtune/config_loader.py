"""The one config loader of every ``tad-tune`` command and the recipe's checks.

A config is a YAML path or the name of a shipped config (``tad-tune ls``), merged with ``key=value`` overrides
the way ``tune run`` merges them (torchtune's own merge: YAML-typed values, so ``lr=0`` is the number 0;
``~key`` removes a key; ``model=<builder>`` swaps a component).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["find_config", "load_config"]


def find_config(config: str | Path) -> Path:
    """The YAML file ``config`` names: a path, or a shipped config name (with or without ``.yaml``).

    Raises:
        FileNotFoundError: neither, with the fix.
    """
    path = Path(config)
    if path.is_file():
        return path
    if path.parent == Path("."):
        from tad_torchtune._registry import config_dirs

        for d in config_dirs():
            candidate = d / f"{path.name.removesuffix('.yaml')}.yaml"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"config {str(config)!r} is neither a file nor a shipped config name; pass a YAML path or a name from "
        "`tad-tune ls`"
    )


def load_config(config: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """A config file (or shipped config name) merged with ``key=value`` / ``~key`` overrides, like ``tune run``.

    Raises:
        FileNotFoundError: no such file or shipped name.
        ValueError: an override that is neither ``key=value`` nor ``~key``.
    """
    path = find_config(config)
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ValueError(f"overrides {bad} are not key=value (or ~key to remove a key)")
    from torchtune.config._utils import _merge_yaml_and_cli_args

    return _merge_yaml_and_cli_args(argparse.Namespace(**OmegaConf.to_container(OmegaConf.load(path))), overrides)
