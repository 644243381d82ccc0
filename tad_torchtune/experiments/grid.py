"""The experiment grid file: a base recipe config, named variants (config overrides) and seeds.

A grid is YAML (``docs/experiments.md`` documents every key; ``configs/experiments/`` ships the default CPU
grid and its GPU profile)::

    name: tad_vs_kd_cpu
    setup: {kind: smollm2, seq_len: 128, heldout_sequences: 128, ood_sequences: 32}
    students: {s20: {layers: "0-9,20-29"}}          # named students the setup builds
    budget: {steps: 24, batch_size: 2}
    eval: {every_steps: 6, curve_sequences: 32}
    seeds: [1, 2, 3]
    base: {optimizer.lr: 3.0e-4}                     # recipe overrides for every run
    variants:
      KD: {overrides: {kd_loss: {_component_: tad_torchtune.ForwardKLLoss}}, seeds: [1, 2, 3, 4, 5]}
      TAD: {overrides: {kd_loss: {_component_: tad_torchtune.TADLoss, top_k: 10, beta: 2.0}}}
    compare: [[TAD, KD]]                             # paired differences A - B in the report

A variant may train on another corpus, made once per grid folder by an offline step
(``experiments/corpora.py``)::

    data:
      miniplm: {kind: miniplm, windows: 128, fraction: 0.5, reference_layers: "0-3,26-29"}
      seqkd: {kind: seqkd, windows: 48, prefix_len: 96, max_new_tokens: 32}
      prompts: {kind: prompts, windows: 48, prefix_len: 96, response_len: 32}   # no teacher: the original text
    variants:
      MiniPLM_CE: {data: miniplm, overrides: {kd_loss: null, kd_weight: 0.0}}
      OnPolicy: {data: prompts, overrides: {on_policy: {fraction: 1.0, max_new_tokens: 32}}}  # docs/on_policy.md

Every run is the real ``knowledge_distillation_tad`` recipe; a variant is any set of recipe-config overrides
(a dotted key sets one value, a mapping replaces the whole node), so a method added to the recipe joins a
grid as one more variant. Runs are ordered seed by seed (every variant of the first seed, then the next),
so a grid stopped early still holds complete paired seeds.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["GridError", "GridSpec", "RunSpec", "Variant", "load_grid", "parse_grid"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SETUP_KINDS = ("smollm2", "tiny")
_TOP_KEYS = {
    "name", "description", "setup", "students", "budget", "eval", "seeds", "base", "data", "variants", "compare"
}  # fmt: skip
_SETUP_KEYS = {"kind", "seq_len", "heldout_sequences", "ood_sequences", "threads", "assets_seed"}
_STUDENT_KEYS = {"layers", "intermediate_dim"}
_BUDGET_KEYS = {"steps", "batch_size"}
_EVAL_KEYS = {"every_steps", "curve_sequences", "ks", "n_bins", "batch_size"}
_VARIANT_KEYS = {"overrides", "seeds", "student", "label", "data"}
DATA_KINDS = ("miniplm", "seqkd", "prompts")
_DATA_COMMON = {"kind", "windows", "sample_seed", "batch_size", "dtype"}
_DATA_KEYS = {
    "miniplm": _DATA_COMMON | {"fraction", "reference_layers"},
    "seqkd": _DATA_COMMON | {"prefix_len", "max_new_tokens", "train_on_prompt"},
    "prompts": {"kind", "windows", "sample_seed", "prefix_len", "response_len"},  # no model: no batch or dtype
}


class GridError(ValueError):
    """A grid file that cannot be run; the message names the key, its value and the fix."""


@dataclass(frozen=True)
class Variant:
    """One method of the grid: recipe overrides, the student it trains and its seeds."""

    name: str
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    student: str
    label: str
    data: str | None = None  # a corpus of the grid's ``data`` section; None: the setup's training text


@dataclass(frozen=True)
class RunSpec:
    """One run: a variant at one seed. ``key`` (``VARIANT/seed_N``) is its folder under ``runs/``."""

    variant: Variant
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant.name}/seed_{self.seed}"


@dataclass
class GridSpec:
    """A parsed, checked grid (see the module docstring)."""

    name: str
    setup: dict[str, Any]
    students: dict[str, dict[str, Any]]
    steps: int
    batch_size: int
    every_steps: int
    curve_sequences: int
    ks: tuple[int, ...]
    n_bins: int
    eval_batch_size: int
    base: dict[str, Any]
    variants: list[Variant]
    compare: list[tuple[str, str]]
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # checked corpora, defaults filled in

    def runs(self) -> list[RunSpec]:
        """Every (variant, seed), ordered by seed position first so early stops keep paired seeds."""
        depth = max(len(v.seeds) for v in self.variants)
        return [RunSpec(v, v.seeds[i]) for i in range(depth) for v in self.variants if i < len(v.seeds)]

    def fingerprint(self, run: RunSpec) -> str:
        """A hash of everything that determines a run's numbers (not its name or the grid's other runs)."""
        what = {
            "setup": {k: v for k, v in self.setup.items() if k != "threads"},
            "student": self.students[run.variant.student],
            "steps": self.steps,
            "batch_size": self.batch_size,
            "eval": [self.every_steps, self.curve_sequences, list(self.ks), self.n_bins],
            "base": self.base,
            "overrides": run.variant.overrides,
            "seed": run.seed,
        }
        if run.variant.data is not None:  # only then: the fingerprints of grids without corpora stay as they were
            what["data"] = self.data[run.variant.data]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fail(where: str, problem: str) -> GridError:
    return GridError(f"grid: {where}: {problem}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"expected a mapping, got {value!r}")
    return value


def _check_keys(node: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(node) - allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _int(node: dict[str, Any], key: str, where: str, default: int | None = None, low: int = 1) -> int:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(f"{where}.{key}", f"must be an integer >= {low}, got {value!r}")
    return value


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"must be a non-empty list of integers, got {value!r}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise _fail(where, f"seeds must be integers >= 0, got {s!r}")
    if len(set(value)) != len(value):
        raise _fail(where, f"seeds repeat: {value}")
    return tuple(value)


def _fits(prefix_len: int, key: str, value: int, seq_len: int, where: str) -> None:
    """An example (prompt + response) must fit one training window, hence the students' context."""
    if prefix_len + value > seq_len:
        raise _fail(
            where,
            f"prefix_len + {key} = {prefix_len + value} > setup.seq_len ({seq_len}); an example must fit the "
            f"students' context: lower prefix_len or {key}",
        )


def _parse_data(raw: dict[str, Any], setup: dict[str, Any], run_windows: int) -> dict[str, dict[str, Any]]:
    """The ``data`` section: named training corpora made by an offline teacher step, defaults filled in.

    ``run_windows`` (steps x batch size) is how many training windows a run sees: the defaults make a
    MiniPLM pool twice that (the selected half is one run's worth) and one Seq-KD or prompts item per window.
    """
    seq_len = int(setup["seq_len"])
    corpora = {}
    for cname, node in raw.items():
        where = f"data.{cname}"
        if not isinstance(cname, str) or not _NAME.match(cname):
            raise _fail("data", f"corpus names must be plain names (letters, digits, _ . -), got {cname!r}")
        node = _mapping(node, where)
        kind = node.get("kind")
        if kind not in DATA_KINDS:
            raise _fail(f"{where}.kind", f"must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
        _check_keys(node, _DATA_KEYS[kind], where)
        out: dict[str, Any] = {"kind": kind, "sample_seed": _int(node, "sample_seed", where, default=0, low=0)}
        if kind == "prompts":  # windows split into prompt and the original continuation: no model runs
            out["windows"] = _int(node, "windows", where, default=run_windows)
            out["prefix_len"] = _int(node, "prefix_len", where, default=None)
            out["response_len"] = _int(node, "response_len", where, default=None)
            _fits(out["prefix_len"], "response_len", out["response_len"], seq_len, where)
            corpora[cname] = out
            continue
        dtype = node.get("dtype", "fp32")
        if dtype not in ("fp32", "bf16"):
            raise _fail(f"{where}.dtype", f"must be fp32 or bf16, got {dtype!r}")
        out["batch_size"] = _int(node, "batch_size", where, default=8)
        out["dtype"] = dtype
        if kind == "miniplm":
            fraction = node.get("fraction", 0.5)
            if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
                raise _fail(f"{where}.fraction", f"must be a number in (0, 1], got {fraction!r}")
            out["fraction"] = float(fraction)
            out["windows"] = _int(node, "windows", where, default=2 * run_windows)
            if int(out["fraction"] * out["windows"]) < 1:
                raise _fail(f"{where}.windows", f"{out['windows']} x fraction {fraction} keeps no window; score more")
            layers = node.get("reference_layers", "0-3,26-29")
            if not isinstance(layers, str) or not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", layers.replace(" ", "")):
                raise _fail(f"{where}.reference_layers", f'must be a layer list such as "0-3,26-29", got {layers!r}')
            out["reference_layers"] = layers
        else:
            out["windows"] = _int(node, "windows", where, default=run_windows)
            out["prefix_len"] = _int(node, "prefix_len", where, default=None)
            out["max_new_tokens"] = _int(node, "max_new_tokens", where, default=None)
            _fits(out["prefix_len"], "max_new_tokens", out["max_new_tokens"], seq_len, where)
            train_on_prompt = node.get("train_on_prompt", False)
            if not isinstance(train_on_prompt, bool):
                raise _fail(f"{where}.train_on_prompt", f"must be true or false, got {train_on_prompt!r}")
            out["train_on_prompt"] = train_on_prompt
        corpora[cname] = out
    return corpora


def parse_grid(raw: Any) -> GridSpec:
    """Checks a grid's mapping and returns it parsed; every problem raises :class:`GridError` before any run."""
    raw = _mapping(raw, "the file")
    _check_keys(raw, _TOP_KEYS, "top level")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail("name", f"must be a plain name (letters, digits, _ . -), got {name!r}")
    setup = _mapping(raw.get("setup"), "setup")
    _check_keys(setup, _SETUP_KEYS, "setup")
    if setup.get("kind") not in SETUP_KINDS:
        raise _fail("setup.kind", f"must be one of {', '.join(SETUP_KINDS)}, got {setup.get('kind')!r}")
    for key in ("seq_len", "heldout_sequences"):
        _int(setup, key, "setup", default=None)
    _int(setup, "ood_sequences", "setup", default=0, low=0)
    students = _mapping(raw.get("students"), "students") or {"default": {}}
    for sname, opts in students.items():
        if not isinstance(sname, str) or not _NAME.match(sname):
            raise _fail("students", f"student names must be plain names, got {sname!r}")
        _check_keys(_mapping(opts, f"students.{sname}"), _STUDENT_KEYS, f"students.{sname}")
    budget = _mapping(raw.get("budget"), "budget")
    _check_keys(budget, _BUDGET_KEYS, "budget")
    steps, batch_size = _int(budget, "steps", "budget"), _int(budget, "batch_size", "budget")
    ev = _mapping(raw.get("eval"), "eval")
    _check_keys(ev, _EVAL_KEYS, "eval")
    every = _int(ev, "every_steps", "eval", default=max(1, steps // 4))
    curve = _int(ev, "curve_sequences", "eval", default=setup["heldout_sequences"])
    if curve > setup["heldout_sequences"]:
        raise _fail("eval.curve_sequences", f"{curve} > setup.heldout_sequences ({setup['heldout_sequences']})")
    ks = ev.get("ks", [1, 5, 10, 20])
    if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise _fail("eval.ks", f"must be a list of integers >= 1, got {ks!r}")
    if min(ks) < 1:
        raise _fail("eval.ks", f"must be >= 1, got {ks!r}")
    seeds = _seeds(raw.get("seeds", [0]), "seeds")
    base = _mapping(raw.get("base"), "base")
    data = _parse_data(_mapping(raw.get("data"), "data"), setup, steps * batch_size)
    variants_raw = _mapping(raw.get("variants"), "variants")
    if not variants_raw:
        raise _fail("variants", "the grid has no variants; add at least one (e.g. KD: {overrides: {...}})")
    variants = []
    for vname, node in variants_raw.items():
        where = f"variants.{vname}"
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise _fail("variants", f"variant names must be plain names (letters, digits, _ . -), got {vname!r}")
        node = _mapping(node, where)
        _check_keys(node, _VARIANT_KEYS, where)
        student = node.get("student", next(iter(students)))
        if student not in students:
            raise _fail(f"{where}.student", f"unknown student {student!r}; the grid's students: {', '.join(students)}")
        overrides = _mapping(node.get("overrides"), f"{where}.overrides")
        for key in overrides:
            if not isinstance(key, str) or not key or key.split(".")[0] in ("output_dir", "seed"):
                raise _fail(f"{where}.overrides", f"{key!r} is set by the runner, not by a variant")
        vseeds = _seeds(node["seeds"], f"{where}.seeds") if "seeds" in node else seeds
        corpus = node.get("data")
        if corpus is not None and corpus not in data:
            known = ", ".join(data) or "none (add a top-level data: section)"
            raise _fail(f"{where}.data", f"unknown corpus {corpus!r}; the grid's corpora: {known}")
        variants.append(Variant(vname, overrides, vseeds, student, str(node.get("label", vname)), corpus))
    names = {v.name for v in variants}
    compare = []
    for pair in raw.get("compare") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in names for p in pair)):
            raise _fail("compare", f"each entry is [A, B] with two variant names, got {pair!r}")
        compare.append((pair[0], pair[1]))
    return GridSpec(
        name=name,
        setup=setup,
        students=students,
        steps=steps,
        batch_size=batch_size,
        every_steps=every,
        curve_sequences=curve,
        ks=tuple(ks),
        n_bins=_int(ev, "n_bins", "eval", default=10),
        eval_batch_size=_int(ev, "batch_size", "eval", default=4),
        base=base,
        variants=variants,
        compare=compare,
        description=str(raw.get("description", "")),
        source=raw,
        data=data,
    )


def shipped_grids() -> dict[str, Path]:
    """The grids under ``configs/experiments/``: ``{name: path}``."""
    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def load_grid(path_or_name: str | Path) -> GridSpec:
    """Reads and checks a grid file (a path, or the name of a shipped grid such as ``tad_vs_kd_cpu``)."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = shipped_grids()
        if str(path_or_name) not in shipped:
            raise GridError(
                f"grid: no file {str(path_or_name)!r} and no shipped grid of that name; "
                f"shipped: {', '.join(shipped) or 'none'}"
            )
        path = shipped[str(path_or_name)]
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"grid: {path} is not valid YAML: {err}") from None
    return parse_grid(raw)
