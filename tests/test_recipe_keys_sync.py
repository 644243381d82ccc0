"""The recipe's keys, validation's schema and docs/recipe.md stay in step: a key the recipe reads is known to
validation (else `tad-tune validate` would refuse it as unknown), documented, and every documented key exists."""

import re
from pathlib import Path

from tad_torchtune.reliability.run_identity import BENIGN_KEYS
from tad_torchtune.validate import RECIPE_KEYS, SCHEMA

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
