"""``tad-tune validate``: every start-up check of the distillation recipe, before any compute is spent.

``tad-tune validate --config configs/tiny_cpu.yaml assets_dir=/tmp/tad_tiny`` prints one line per problem and
exits 1, or prints ``OK`` and exits 0. The recipe runs the same checks (:func:`validate_or_raise`) first
thing, before a process group, a model or a dataset exists.

This module only orchestrates: each check lives beside its subject and returns ``(key, message)`` pairs, run
here in this order (cheap checks first; a refused ``output_dir`` or resume stops before any model is built):

- config keys and components (:mod:`tad_torchtune.recipe_settings`: :func:`key_problems`,
  :func:`component_problems`): unknown or misspelled top-level keys and component arguments (closest valid key
  suggested), components that cannot be imported;
- settings (:func:`~tad_torchtune.recipe_settings.settings_problems`, the same parse the recipe runs with):
  every number finite, the typed table ``SCHEMA`` (``seed``, batch geometry, loss weights, ``lr``, ``top_k``,
  ...), switches, dtype, ``nonfinite_policy``, ``fused_loss``, ``peak_flops``, ``kd_ratio``, the ``on_policy:``
  section's values;
- output (:func:`~tad_torchtune.reliability.run_identity.output_dir_problems`): ``output_dir`` is (or can be
  made) a writable folder no other live run holds;
- resume (:func:`~tad_torchtune.checkpoint.checks.resume_problems`): a new run (``resume_from_checkpoint:
  false``) is refused in a folder holding another run's checkpoints; the checkpoint resumed is complete
  (manifest), loads without running code, belongs to one run, and was written by the same number of processes
  with the same meaning-changing keys; benign changes are notes; ``true`` with no checkpoint yet is fine;
- models (:mod:`tad_torchtune.models.checks`): buildable on the meta device (no memory, no weights), teacher
  vocabulary >= student vocabulary, ``top_k`` < vocabulary, tokenizer ``max_seq_len`` <= what the models support;
- teacher cache (:func:`~tad_torchtune.offline.teacher_cache_checks.cache_problems`): a complete cache whose
  vocabulary, K_max and temperature fit the run, a kd_loss it can serve (TADLoss, ForwardKLLoss), no cosine
  term, no fused loss;
- checkpoints (:func:`~tad_torchtune.checkpoint.checks.checkpointer_problems`): every configured file exists,
  loads without running code, and (torchtune format) holds exactly the model's keys and shapes;
- tokenizers (:func:`~tad_torchtune.data.checks.tokenizer_problems`): the files exist, ids fit the student,
  ``teacher_tokenizer`` (when given) agrees with ``tokenizer`` on every shared id;
- data (:mod:`tad_torchtune.data.checks`): the dataset builds and has at least one optimizer step's worth of
  samples; with a teacher cache, it is the cache's corpus
  (:func:`~tad_torchtune.offline.teacher_cache_checks.corpus_problems`);
- on-policy fit (:func:`~tad_torchtune.training.on_policy.fit_problems`): unpacked prompt-masked data, prompts +
  ``max_new_tokens`` within both models' ``max_seq_len``, a teacher to grade the samples;
- the metric logger's package is installed (:func:`logger_package_problems`).

Nothing is written except a probe file in an existing ``output_dir`` (removed at once); checkpoints are
never touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tad_torchtune.check_tools import model_vocab, one_line
from tad_torchtune.config_loader import load_config
from tad_torchtune.recipe_settings import (
    RecipeSettings,
    checked_settings,
    component_problems,
    key_problems,
    uses_live_teacher,
)

__all__ = [
    "ConfigValidationError",
    "Problem",
    "load_config",
    "logger_package_problems",
    "main",
    "model_vocab",
    "validate_config",
    "validate_or_raise",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: the key it is about and one sentence saying what and how to fix it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigValidationError(ValueError):
    """The config failed start-up validation; ``problems`` lists every finding."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"config validation found {len(problems)} problem(s), nothing was run:\n{lines}")


class _Checker:
    """Runs the subject checks in order over one config and keeps what they found and built."""

    def __init__(self, cfg: DictConfig, check_data: bool, world_size: int, check_lock: bool = True):
        self.cfg = cfg
        self.check_lock = check_lock
        self.check_data = check_data
        self.world_size = world_size
        self.problems: list[Problem] = []
        self.notes: list[str] = []  # accepted but worth saying (benign config changes on resume)
        self.models: dict[str, Any] = {}
        self.tokenizer = None
        self.dataset_parts: list[Any] = []  # built by data(); the recipe's setup reuses them
        self.manifest: dict[str, Any] | None = None  # of teacher_cache, once read
        self.parsed: RecipeSettings | None = None  # the typed settings, when every value is good

    def add(self, found: Iterable[tuple[str, str]]) -> None:
        self.problems.extend(Problem(key, message) for key, message in found)

    def reported(self, prefix: str = "") -> list[str]:
        """Keys reported so far (those starting with ``prefix``)."""
        return [p.key for p in self.problems if p.key.startswith(prefix)]

    def run(self) -> list[Problem]:
        try:
            OmegaConf.to_container(self.cfg, resolve=True)
        except Exception as err:  # an unresolved ${...}: nothing else can be trusted
            self.add([("config", f"cannot resolve interpolations ({one_line(err)})")])
            return self.problems
        # Cheap checks first; a refused resume or folder stops before any model, tokenizer or dataset is built.
        for step in (self.keys, self.components, self.settings, self.output_dir, self.resume):
            self._run(step)
        if {"output_dir", "resume_from_checkpoint"} & set(self.reported()):
            return self.problems
        for step in (
            self.build_models,
            self.teacher_cache,
            self.checkpoints,
            self.tokenizers,
            self.data,
            self.on_policy_fit,
        ):
            self._run(step)
        return self.problems

    def _run(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as err:  # a check must never crash with a deep traceback
            self.add([("config", f"check {step.__name__} failed: {one_line(err)}")])

    def _weight(self, key: str) -> float:
        """A loss weight as the recipe will use it (``kd_ratio`` applied); read as written when values are bad."""
        if self.parsed is not None:
            return {"kd_weight": self.parsed.loss.kd_weight, "cosine_weight": self.parsed.loss.cosine_weight}[key]
        return float(self.cfg.get(key, 1.0 if key == "kd_weight" else 0.0) or 0)

    def _uses_live_teacher(self) -> bool:
        """Whether the recipe loads the teacher: a divergence without ``teacher_cache``, or a cosine term."""
        return uses_live_teacher(
            self._weight("kd_weight"), self._weight("cosine_weight"), self.cfg.get("teacher_cache")
        )

    # --- the steps, in run order (each name appears in "check <name> failed" should one crash) ------------
    def keys(self) -> None:
        self.add(key_problems(self.cfg))

    def components(self) -> None:
        self.add(component_problems(self.cfg))

    def settings(self) -> None:
        """Every plain value (numbers, switches, choices, the on_policy section): ``recipe_settings``' rules."""
        self.parsed, problems = checked_settings(self.cfg)
        self.add(problems)

    def output_dir(self) -> None:
        from tad_torchtune.reliability.run_identity import output_dir_problems

        self.add(output_dir_problems(self.cfg.get("output_dir"), check_lock=self.check_lock))

    def resume(self) -> None:
        from tad_torchtune.checkpoint.checks import resume_problems

        self.add(resume_problems(self.cfg, self.world_size, self.notes))

    def build_models(self) -> None:
        from tad_torchtune.models.checks import build_on_meta, size_problems

        self.models, found = build_on_meta(self.cfg, reported=self.reported())
        self.add(found)
        self.add(size_problems(self.cfg, self.models, uses_teacher=self._uses_live_teacher()))

    def teacher_cache(self) -> None:
        from tad_torchtune.offline.teacher_cache_checks import cache_problems

        self.manifest, found = cache_problems(
            self.cfg, student_vocab=model_vocab(self.models.get("model")), loss_weight=self._weight, notes=self.notes
        )
        self.add(found)

    def checkpoints(self) -> None:
        from tad_torchtune.checkpoint.checks import checkpointer_problems

        uses_teacher = self._uses_live_teacher()
        self.add(checkpointer_problems(self.cfg, self.models, uses_teacher=uses_teacher, reported=self.reported()))

    def tokenizers(self) -> None:
        from tad_torchtune.data.checks import tokenizer_problems

        if self.cfg.get("tokenizer") is None or self.reported("tokenizer"):
            return
        self.tokenizer, found = tokenizer_problems(self.cfg, student_vocab=model_vocab(self.models.get("model")))
        self.add(found)

    def data(self) -> None:
        from tad_torchtune.data.checks import build_datasets, dataset_size_problems

        if not self.check_data or self.tokenizer is None or self.cfg.get("dataset") is None or self.reported("dataset"):
            return
        parts, found = build_datasets(self.cfg, self.tokenizer)
        self.add(found)
        if parts is None:
            return
        self.dataset_parts = parts
        if self.manifest is not None and "teacher_cache" not in self.reported():
            from tad_torchtune.offline.teacher_cache_checks import corpus_problems

            self.add(corpus_problems(self.manifest, parts))
        self.add(dataset_size_problems(self.cfg, parts, self.world_size))

    def on_policy_fit(self) -> None:
        from tad_torchtune.training.on_policy import fit_problems

        if self.cfg.get("on_policy") is None or self.reported("on_policy"):
            return
        self.add(
            fit_problems(
                self.cfg,
                loss_weight=self._weight,
                models=self.models,
                dataset_parts=self.dataset_parts,
                notes=self.notes,
            )
        )


def validate_config(
    cfg: DictConfig,
    *,
    check_data: bool = True,
    world_size: int | None = None,
    notes: list[str] | None = None,
    check_lock: bool = True,
    built: dict[str, Any] | None = None,
) -> list[Problem]:
    """Runs every start-up check; returns the problems found (empty when the config is good).

    Args:
        cfg (DictConfig): a ``knowledge_distillation_tad`` config.
        check_data (bool): build the dataset to check it is non-empty and long enough. Default: True
        world_size (int | None): processes the run will use. Default: ``$WORLD_SIZE`` or 1
        notes (list[str] | None): when given, receives what was accepted but is worth saying (benign config
            changes on resume, a resume with nothing to resume yet). Default: None
        check_lock (bool): refuse an ``output_dir`` whose run lock another process holds. The recipe's ranks
            other than 0 pass False: their own rank 0 may already hold it. Default: True
        built (dict[str, Any] | None): when given and the config is good, receives what the checks built so the
            caller need not build it again: ``settings`` (the typed :class:`RecipeSettings`), ``tokenizer`` and
            ``dataset_parts`` (one dataset per ``dataset``
            entry, built with that tokenizer). Default: None

    Returns:
        list[Problem]: one entry per finding, each naming the key.
    """
    ws = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
    checker = _Checker(cfg, check_data=check_data, world_size=ws, check_lock=check_lock)
    problems = checker.run() + logger_package_problems(cfg)
    if notes is not None:
        notes.extend(checker.notes)
    if built is not None and not problems:
        built["settings"] = checker.parsed
        if checker.tokenizer is not None:
            built["tokenizer"] = checker.tokenizer
        if checker.dataset_parts:
            built["dataset_parts"] = checker.dataset_parts
    return problems


def validate_or_raise(cfg: DictConfig, **kwargs: Any) -> None:
    """:func:`validate_config`, raising :class:`ConfigValidationError` listing every problem."""
    problems = validate_config(cfg, **kwargs)
    if problems:
        raise ConfigValidationError(problems)


def main(argv: list[str] | None = None) -> int:
    """``tad-tune validate --config X [key=value ...]``: exit 0 when the config is good, 1 with one line per problem."""
    parser = argparse.ArgumentParser(
        prog="tad-tune validate",
        description="Check a knowledge_distillation_tad config before spending any compute (docs/reliability.md).",
    )
    parser.add_argument("--config", required=True, help="config file or shipped config name (e.g. tiny_cpu)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tune run")
    parser.add_argument("--no-data", action="store_true", help="skip building the dataset")
    parser.add_argument("--world-size", type=int, default=None, help="processes the run will use (default 1)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except Exception as err:
        print(f"config: {one_line(err)}", file=sys.stderr)
        return 1
    notes: list[str] = []
    problems = validate_config(cfg, check_data=not args.no_data, world_size=args.world_size, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if problems:
        for p in problems:
            print(p)
        print(f"{len(problems)} problem(s); nothing was run", file=sys.stderr)
        return 1
    print("OK")
    return 0


# metric logger class -> (module it imports when built, pip extra of ours or package to install)
_LOGGER_PACKAGES = {
    "TensorBoardLogger": ("tensorboard", "pip install 'tad_torchtune[tensorboard]'"),
    "WandBLogger": ("wandb", "pip install 'tad_torchtune[wandb]'"),
    "CometLogger": ("comet_ml", "pip install comet_ml"),
    "MLFlowLogger": ("mlflow", "pip install mlflow"),
}


def logger_package_problems(cfg: DictConfig) -> list[Problem]:
    """A ``metric_logger`` whose package is missing: torchtune imports it only when the run builds the logger."""
    import importlib.util

    component = str(OmegaConf.select(cfg, "metric_logger._component_", default=None) or "")
    need = _LOGGER_PACKAGES.get(component.rsplit(".", 1)[-1])
    if need is None or importlib.util.find_spec(need[0]) is not None:
        return []
    return [
        Problem(
            "metric_logger._component_",
            f"{component} needs the `{need[0]}` package, which is not installed: {need[1]}, "
            "or use torchtune.training.metric_logging.DiskLogger",
        )
    ]


if __name__ == "__main__":
    raise SystemExit(main())
