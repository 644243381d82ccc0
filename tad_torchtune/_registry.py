"""torchtune's ``tune`` CLI with our recipes and shipped configs registered (``tad-tune ls | cp | run | cat``).

torchtune 0.6.1 has no plugin mechanism: ``tune ls/cp/run/cat`` read the module-level list
``torchtune._recipe_registry._ALL_RECIPES``. We append our entries to that list (once, in this process)
and then run torchtune's own CLI, so every ``tune`` behaviour (torchrun flags, ``key=value`` overrides,
``--config <name or path>``) is unchanged. Absolute ``file_path`` values work because torchtune joins them
with ``pathlib`` (``ROOT / "recipes" / "/abs/kd_tad.py"`` is ``/abs/kd_tad.py``).

Registered recipes:

- ``knowledge_distillation_tad`` -> ``tad_torchtune/recipes/kd_tad.py``; configs: ``tad_torchtune/configs/*.yaml``
  except ``eval_*`` (names are file stems, e.g. ``tiny_cpu``).
- ``eval_tad`` -> ``tad_torchtune/eval/eval_tad.py`` (listed once that file exists); configs: ``configs/eval_*.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torchtune._recipe_registry import _ALL_RECIPES, Config, Recipe

PACKAGE_DIR = Path(__file__).resolve().parent

KD_RECIPE = "knowledge_distillation_tad"
EVAL_RECIPE = "eval_tad"


def config_dirs() -> list[Path]:
    """Where shipped configs live: inside the package (``tad_torchtune/configs``, in every install, wheel or
    editable; a checkout's top-level ``configs`` is a link to it)."""
    return [p for p in (PACKAGE_DIR / "configs",) if p.is_dir()]


def _configs(match) -> list[Config]:
    found: dict[str, Config] = {}
    for d in config_dirs():
        for path in sorted(d.glob("*.yaml")):
            if match(path.stem) and path.stem not in found:
                found[path.stem] = Config(name=path.stem, file_path=str(path))
    return list(found.values())


def our_recipes() -> list[Recipe]:
    """The :class:`torchtune._recipe_registry.Recipe` entries for this package (absolute paths)."""
    recipes = [
        Recipe(
            name=KD_RECIPE,
            file_path=str(PACKAGE_DIR / "recipes" / "kd_tad.py"),
            configs=_configs(lambda stem: not stem.startswith("eval_")),
            supports_distributed=True,
        )
    ]
    eval_file = PACKAGE_DIR / "eval" / "eval_tad.py"
    if eval_file.is_file():
        recipes.append(
            Recipe(
                name=EVAL_RECIPE,
                file_path=str(eval_file),
                configs=_configs(lambda stem: stem.startswith("eval_")),
                supports_distributed=False,
            )
        )
    return recipes


def register() -> None:
    """Adds (or refreshes) our recipes in torchtune's registry list; idempotent."""
    ours = our_recipes()
    names = {r.name for r in ours}
    _ALL_RECIPES[:] = [r for r in _ALL_RECIPES if r.name not in names] + ours


def tune_main(argv: list[str] | None = None) -> int:
    """Runs torchtune's ``tune`` CLI with our recipes registered.

    Args:
        argv (list[str] | None): arguments after the program name, e.g. ``["run", "knowledge_distillation_tad",
            "--config", "tiny_cpu"]``. Default: ``sys.argv[1:]``.

    Returns:
        int: 0 on success (argparse errors exit with status 2, as in ``tune``).
    """
    from torchtune._cli.tune import TuneCLIParser

    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    # torchtune parses sys.argv itself (and ``tune run`` counts it to detect torchrun flags).
    sys.argv = ["tune", *argv]
    parser = TuneCLIParser()
    args = parser.parse_args()
    parser.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(tune_main())
