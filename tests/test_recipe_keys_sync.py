"""The recipe's keys, the typed settings, validation's schema and docs/recipe.md stay in step: a key the recipe
reads is known to validation (else `tad-tune validate` would refuse it as unknown), documented, and every
documented key exists; every recipe key is either a component the recipe instantiates or a typed setting."""

import dataclasses
import re
import typing
from pathlib import Path

from tad_torchtune.recipe_settings import BOOL_KEYS, CHOICE_KEYS, COMPONENT_KEYS, RECIPE_KEYS, SCHEMA, RecipeSettings
from tad_torchtune.reliability.run_identity import BENIGN_KEYS

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tad_torchtune" / "recipes" / "kd_tad.py"


def _read_by_recipe() -> set[str]:
    """Top-level config keys the recipe's source reads (``cfg.get("x"``, ``cfg.x``, ``cfg["x"]``)."""
    source = RECIPE.read_text()
    keys = set(re.findall(r'\bcfg\.get\("([a-z_]+)"', source))
    keys |= set(re.findall(r'\bcfg\["([a-z_]+)"\]', source))
    keys |= {k for k in re.findall(r"\bcfg\.([a-z_]+)\b", source) if k not in {"get", "pop", "keys", "items"}}
    return keys


def _documented() -> set[str]:
    """Keys in the first column of docs/recipe.md's key table (a cell may name several: `a`, `b`)."""
    keys: set[str] = set()
    in_table = False
    for line in (ROOT / "docs" / "recipe.md").read_text().splitlines():
        if line.startswith("| key | meaning |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            in_table = False
        if in_table and not line.startswith("|---"):
            keys |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return keys


def test_every_key_the_recipe_reads_is_known_to_validation():
    assert _read_by_recipe() - RECIPE_KEYS == set()


def test_docs_table_and_validation_list_the_same_keys():
    documented = _documented()
    assert RECIPE_KEYS - documented == set(), "keys the recipe takes but docs/recipe.md does not describe"
    assert documented - RECIPE_KEYS == set(), "keys docs/recipe.md describes but validation would refuse"


def test_schema_and_resume_classification_name_only_recipe_keys():
    assert {k.split(".")[0] for k in SCHEMA} - RECIPE_KEYS == set()
    assert BENIGN_KEYS - RECIPE_KEYS == set()


# Keys parse_settings folds into other fields or reads as nodes: kd_ratio becomes (ce_weight, kd_weight),
# fused_loss is LossSettings.fused_mode, dataset and hidden_layer_map are structured nodes the recipe builds from.
_SETTING_ALIASES = {"kd_ratio", "fused_loss", "dataset", "hidden_layer_map"}


def _setting_fields() -> set[str]:
    """Every leaf field of RecipeSettings: a section's fields stand for their keys (on_policy is one key)."""
    from tad_torchtune.training.on_policy import OnPolicySettings

    hints = typing.get_type_hints(RecipeSettings, localns={"OnPolicySettings": OnPolicySettings})
    names: set[str] = set()
    for f in dataclasses.fields(RecipeSettings):
        section = hints[f.name]
        if dataclasses.is_dataclass(section) and f.name != "on_policy":
            names |= {g.name for g in dataclasses.fields(section)}
        else:
            names.add(f.name)
    return names


def test_every_recipe_key_is_a_component_or_a_typed_setting():
    settings = _setting_fields() - {"fused_mode"}
    assert settings - RECIPE_KEYS == set(), "typed settings no config key feeds"
    untyped = RECIPE_KEYS - settings - set(COMPONENT_KEYS) - _SETTING_ALIASES
    assert untyped == set(), "recipe keys neither instantiated nor parsed into RecipeSettings"


def test_every_checked_scalar_is_a_recipe_key():
    assert set(BOOL_KEYS) - RECIPE_KEYS == set()
    assert set(CHOICE_KEYS) - RECIPE_KEYS == set()
