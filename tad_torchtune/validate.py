"""``tad-tune validate``: every start-up check of the distillation recipe, before any compute is spent.

``tad-tune validate --config configs/tiny_cpu.yaml assets_dir=/tmp/tad_tiny`` prints one line per problem and
exits 1, or prints ``OK`` and exits 0. The recipe runs the same checks (:func:`validate_or_raise`) first
thing, before a process group, a model or a dataset exists. Checks:

- config keys: unknown or misspelled top-level keys and component arguments (closest valid key suggested);
- settings: :func:`~tad_torchtune.recipe_settings.settings_problems`, the same parse the recipe runs with (every
  number anywhere in the config finite; the typed table ``SCHEMA``: ``seed``, batch geometry, loss weights,
  ``lr``, ``clip_grad_norm``, ``top_k``, ``beta``, ...; switches; dtype, ``nonfinite_policy``, ``fused_loss``,
  ``peak_flops``, ``kd_ratio`` against the weights; the ``on_policy:`` section); ``top_k >= vocab``;
- models: buildable (on the meta device: no memory, no weights), teacher vocabulary >= student vocabulary,
  tokenizer ids fit the student, tokenizer ``max_seq_len`` <= what both models support;
- checkpoints: every configured file exists, loads without running code, and (torchtune format) holds
  exactly the model's keys and shapes;
- tokenizers: ``teacher_tokenizer`` (when given) agrees with ``tokenizer`` on every shared id;
- data: the dataset builds and has at least one optimizer step's worth of samples;
- teacher cache (``teacher_cache``): a complete cache whose vocabulary, K_max, temperature, sequence count and
  corpus fingerprint fit the run, a kd_loss it can serve (TADLoss, ForwardKLLoss), no cosine term, no fused loss;
- output: ``output_dir`` is (or can be made) a writable folder; a new run (``resume_from_checkpoint: false``)
  is refused in a folder holding another run's checkpoints;
- resume: the checkpoint is complete (manifest), loads without running code, belongs to one run, and was
  written by the same number of processes with the same meaning-changing keys (models, data, batch geometry,
  losses, seed; :func:`~tad_torchtune.reliability.run_identity.compare_configs`); benign changes are notes.
  ``resume_from_checkpoint: true`` with no checkpoint yet is fine (the run starts at step 0 with a warning).

Nothing is written except a probe file in an existing ``output_dir`` (removed at once); checkpoints are
never touched.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tad_torchtune.config_loader import load_config
from tad_torchtune.recipe_settings import (
    COMPONENT_KEYS,
    RECIPE_KEYS,
    RecipeSettings,
    parse_settings,
    settings_problems,
    uses_live_teacher,
)

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w]*)")


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


def _suggest(key: str, valid: list[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _short(err: BaseException) -> str:
    """An exception as one line (its last non-empty line; no traceback)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if len(lines) == 1 else (lines[-1] if lines else '')}"[:400]


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


class _Checker:
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

    def add(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def run(self) -> list[Problem]:
        try:
            OmegaConf.to_container(self.cfg, resolve=True)
        except Exception as err:  # an unresolved ${...}: nothing else can be trusted
            self.add("config", f"cannot resolve interpolations ({_short(err)})")
            return self.problems
        # Cheap checks first; a refused resume or folder stops before any model, tokenizer or dataset is built.
        cheap = (self.keys, self.components, self.settings)
        for step in (*cheap, self.output_dir, self.resume):
            self._run(step)
        if any(p.key in ("output_dir", "resume_from_checkpoint") for p in self.problems):
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

    def _run(self, step) -> None:
        try:
            step()
        except Exception as err:  # a check must never crash with a deep traceback
            self.add("config", f"check {step.__name__} failed: {_short(err)}")

    # --- keys -------------------------------------------------------------------------------------
    def keys(self) -> None:
        raw = OmegaConf.to_container(self.cfg, resolve=False)
        referenced = set(_INTERPOLATION.findall(OmegaConf.to_yaml(OmegaConf.create(raw))))
        for key in self.cfg.keys():
            key = str(key)
            if key in RECIPE_KEYS or key in referenced:
                continue
            self.add(key, f"unknown config key{_suggest(key, RECIPE_KEYS) or ' (the recipe never reads it)'}")

    def components(self) -> None:
        from torchtune.config._utils import _get_component_from_path

        nodes = [(k, self.cfg.get(k)) for k in COMPONENT_KEYS]
        ds = self.cfg.get("dataset")
        nodes += [(f"dataset[{i}]", d) for i, d in enumerate(ds)] if isinstance(ds, ListConfig) else [("dataset", ds)]
        for key, node in nodes:
            if node is None:
                continue
            if not isinstance(node, DictConfig) or "_component_" not in node:
                self.add(key, "expected a mapping with a _component_ (dotted path of a builder or class)")
                continue
            path = str(node["_component_"])
            try:
                target = _get_component_from_path(path)
            except Exception as err:
                self.add(f"{key}._component_", f"cannot import {path!r} ({_short(err)})")
                continue
            try:
                params = inspect.signature(target).parameters
            except (TypeError, ValueError):
                continue
            if any(p.kind == p.VAR_KEYWORD for p in params.values()):
                continue
            valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            for arg in node:
                if arg != "_component_" and arg not in valid:
                    hint = _suggest(str(arg), valid) or f" (it takes {', '.join(valid)})"
                    self.add(f"{key}.{arg}", f"{path} has no argument {arg!r}{hint}")

    # --- settings -----------------------------------------------------------------------------------
    def settings(self) -> None:
        """Every plain value (numbers, switches, choices, the on_policy section): ``recipe_settings``' rules."""
        problems = settings_problems(self.cfg)
        for key, message in problems:
            self.add(key, message)
        self.parsed = None if problems else parse_settings(self.cfg)

    def _weight(self, key: str) -> float:
        """A loss weight as the recipe will use it (``kd_ratio`` applied); read as written when values are bad."""
        if self.parsed is not None:
            return {"kd_weight": self.parsed.loss.kd_weight, "cosine_weight": self.parsed.loss.cosine_weight}[key]
        return float(self.cfg.get(key, 1.0 if key == "kd_weight" else 0.0) or 0)

    def _component_default(self, key: str, arg: str) -> Any:
        """``cfg[key][arg]``, else the component's default for ``arg`` (None when unknown)."""
        node = self.cfg.get(key)
        if node is None:
            return None
        if arg in node:
            return node[arg]
        try:
            from torchtune.config._utils import _get_component_from_path

            p = inspect.signature(_get_component_from_path(str(node["_component_"]))).parameters.get(arg)
            return None if p is None or p.default is inspect.Parameter.empty else p.default
        except Exception:
            return None

    def on_policy_fit(self) -> None:
        """With ``on_policy.fraction`` > 0: unpacked prompt/response data, prompts + ``max_new_tokens`` within both
        models' ``max_seq_len``, a teacher to grade the samples."""
        from tad_torchtune.training import on_policy as op

        node = self.cfg.get("on_policy")
        if node is None or any(p.key.startswith("on_policy") for p in self.problems):
            return
        settings = op.OnPolicySettings.from_config(node)
        if settings.fraction == 0:
            return
        if self.cfg.get("teacher_cache") is not None:
            self.add(
                "on_policy.fraction",
                "cannot be used with teacher_cache: the student's samples are new tokens no cache holds; set "
                "on_policy.fraction: 0 or remove teacher_cache",
            )
            return
        ds = self.cfg.get("dataset")
        nodes = list(ds) if isinstance(ds, ListConfig) else [ds] if ds is not None else []
        if any(isinstance(d, DictConfig) and d.get("packed", False) for d in nodes):
            self.add("on_policy.fraction", "needs unpacked data (packed: true puts several prompts in a row)")
            return
        if self._weight("kd_weight") == 0:
            self.add(
                "on_policy.fraction",
                "needs a divergence to grade the samples; kd_weight is 0 (CE on the "
                "student's own samples teaches nothing new)",
            )
        limits = [getattr(self.models.get(k), "max_seq_len", None) for k in ("model", "teacher_model")]
        limits = [n for n in limits if isinstance(n, int)]
        data_limits = [_get(self.cfg, "tokenizer.max_seq_len")]
        data_limits += [d.get("max_seq_len") for d in nodes if isinstance(d, DictConfig)]
        data_limits = [n for n in data_limits if isinstance(n, int) and n > 0]
        if limits and data_limits:
            problem = op.length_problem(settings.max_new_tokens, min(data_limits), min(limits))
            if problem is not None:
                self.add("on_policy.max_new_tokens", problem)
        elif limits:
            self.notes.append(
                "on_policy: the data sets no max_seq_len, so prompt + max_new_tokens cannot be checked before the "
                "run; generation stops at the models' max_seq_len"
            )
        if self.dataset_parts:
            loss = self.cfg.get("loss")
            ignore = int(loss.get("ignore_index", -100)) if isinstance(loss, DictConfig) else -100
            samples = [part[i] for part in self.dataset_parts for i in range(min(len(part), 32))]
            problem = op.prompt_mask_problem(samples, ignore)
            if problem is not None:
                self.add("dataset", problem)

    def _uses_live_teacher(self) -> bool:
        """Whether the recipe loads the teacher: a divergence without ``teacher_cache``, or a cosine term."""
        return uses_live_teacher(
            self._weight("kd_weight"), self._weight("cosine_weight"), self.cfg.get("teacher_cache")
        )

    # --- models -------------------------------------------------------------------------------------
    def build_models(self) -> None:
        import torch
        from torchtune import config

        for key in ("model", "teacher_model"):
            node = self.cfg.get(key)
            if (
                node is None
                or not isinstance(node, DictConfig)
                or any(p.key.startswith(f"{key}.") for p in self.problems)
            ):
                continue
            try:
                with torch.device("meta"):
                    self.models[key] = config.instantiate(node)
            except Exception as err:
                self.add(key, f"cannot build the model ({_short(err)})")
        student, teacher = self.models.get("model"), self.models.get("teacher_model")
        v_s = model_vocab(student)
        v_t = model_vocab(teacher)
        uses_teacher = self._uses_live_teacher()
        if uses_teacher and v_s is not None and v_t is not None and v_t < v_s:
            self.add(
                "teacher_model.vocab_size",
                f"teacher vocabulary {v_t} < student vocabulary {v_s}: student ids >= {v_t} would get no teacher "
                "logits; use a teacher of the same tokenizer family or a student with <= the teacher's vocabulary",
            )
        top_k = self._component_default("kd_loss", "top_k") if self.cfg.get("kd_loss") is not None else None
        if isinstance(top_k, int) and v_s is not None and top_k >= v_s:
            self.add("kd_loss.top_k", f"top_k={top_k} must be smaller than the student vocabulary ({v_s})")
        seq = _get(self.cfg, "tokenizer.max_seq_len")
        if isinstance(seq, int):
            limits = [
                (getattr(m, "max_seq_len", None), k)
                for k, m in (("model", student), ("teacher_model", teacher if uses_teacher else None))
            ]
            limits = [(n, k) for n, k in limits if isinstance(n, int)]
            if limits and seq > min(limits)[0]:
                limit, key = min(limits)
                self.add(
                    "tokenizer.max_seq_len",
                    f"{seq} is larger than {key} supports ({key}.max_seq_len={limit}); lower it to <= {limit}",
                )

    # --- teacher cache --------------------------------------------------------------------------------
    def teacher_cache(self) -> None:
        """``teacher_cache``: readable, complete, and able to serve this run's kd_loss (docs/teacher_cache.md)."""
        path = self.cfg.get("teacher_cache")
        if path is None:
            return
        from torchtune.config._utils import _get_component_from_path

        from tad_torchtune.losses import ForwardKLLoss, TADLoss
        from tad_torchtune.offline.teacher_cache import TeacherCacheError, check_compatible, read_manifest

        try:
            self.manifest = read_manifest(str(path))
        except TeacherCacheError as err:
            self.add("teacher_cache", str(err))
            return
        if self._weight("cosine_weight") != 0:
            self.add("teacher_cache", "cosine_weight needs the teacher's hidden states, which a cache does not hold")
        if str(self.cfg.get("fused_loss", "auto")).strip().lower() == "true":
            self.add("fused_loss", "true, but teacher_cache is set: the cached rows meet chunked logits; use auto")
        node = self.cfg.get("kd_loss")
        if node is None or self._weight("kd_weight") == 0:
            self.notes.append("teacher_cache is set but kd_weight is 0 (or no kd_loss): the cache is not read")
            return
        try:
            kind = _get_component_from_path(str(node["_component_"]))
        except Exception:
            return  # components() reported it
        if not (isinstance(kind, type) and issubclass(kind, (TADLoss, ForwardKLLoss))):
            self.add(
                "kd_loss._component_",
                f"{node['_component_']} with teacher_cache: a cache serves tad_torchtune.TADLoss and "
                "tad_torchtune.ForwardKLLoss only",
            )
            return
        top_k = self._component_default("kd_loss", "top_k") if issubclass(kind, TADLoss) else None
        temperature = self._component_default("kd_loss", "temperature")
        try:
            check_compatible(
                self.manifest,
                where="",
                vocab_size=model_vocab(self.models.get("model")),
                top_k=top_k if isinstance(top_k, int) else None,
                temperature=temperature if isinstance(temperature, int | float) else None,
            )
        except TeacherCacheError as err:
            self.add("teacher_cache", str(err))

    # --- checkpoints ----------------------------------------------------------------------------------
    def checkpoints(self) -> None:
        uses_teacher = self._uses_live_teacher()
        pairs = [("checkpointer", "model")] + ([("teacher_checkpointer", "teacher_model")] if uses_teacher else [])
        for key, model_key in pairs:
            node = self.cfg.get(key)
            if node is None:
                if key == "teacher_checkpointer":
                    self.add(key, "kd_weight or cosine_weight is non-zero but no teacher_checkpointer is configured")
                continue
            if any(p.key.startswith(f"{key}.") or p.key == key for p in self.problems):
                continue
            ckpt_dir = Path(str(node.get("checkpoint_dir", "")))
            if not ckpt_dir.is_dir():
                self.add(f"{key}.checkpoint_dir", f"{ckpt_dir} is not a folder")
                continue
            files = node.get("checkpoint_files")
            if not isinstance(files, ListConfig):
                continue  # torchtune's {filename_format, max_filename} form: torchtune checks it itself
            missing = [str(f) for f in files if not (ckpt_dir / str(f)).is_file()]
            if missing:
                self.add(f"{key}.checkpoint_files", f"missing under {ckpt_dir}: {', '.join(missing)}")
                continue
            component = str(node.get("_component_", ""))
            model = self.models.get(model_key)
            if (
                component.endswith(("FullModelTorchTuneCheckpointer", "FullModelMetaCheckpointer"))
                and model is not None
            ):
                self._compare_weights(key, ckpt_dir, [str(f) for f in files], model, component.endswith("Meta"))
            elif component.endswith("HFCheckpointer") and not (ckpt_dir / "config.json").is_file():
                self.add(f"{key}.checkpoint_dir", f"{ckpt_dir} has no config.json (an HF checkpoint needs it)")

    def _compare_weights(self, key: str, ckpt_dir: Path, files: list[str], model: Any, meta: bool) -> None:
        from tad_torchtune.checkpoint.safe_load import UnsafeCheckpointError, safe_load

        shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            try:
                sd = _shapes_only(ckpt_dir / name)
            except UnsafeCheckpointError as err:
                self.add(f"{key}.checkpoint_files", str(err))
                return
            except Exception as err:
                self.add(f"{key}.checkpoint_files", f"cannot read {ckpt_dir / name} ({_short(err)})")
                return
            shapes.update(sd)
        if meta:
            return  # Meta key names are converted by torchtune; existence and safety were checked
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
        if missing or extra or wrong:
            parts = []
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: file {shapes[k]} vs model {expected[k]}")
            if missing:
                parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
            if extra:
                parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[0]}")
            model_key = "model" if key == "checkpointer" else "teacher_model"
            self.add(
                f"{key}.checkpoint_files",
                f"{ckpt_dir} does not match {model_key}: {'; '.join(parts)} (wrong checkpoint or wrong model dims)",
            )
        del safe_load

    # --- tokenizers -----------------------------------------------------------------------------------
    def tokenizers(self) -> None:
        from torchtune import config

        if self.cfg.get("tokenizer") is None or any(p.key.startswith("tokenizer") for p in self.problems):
            return
        # tokenizer files that are not there yet (model not downloaded): one clear line each, for both sides
        missing = {key: self._missing_tokenizer_files(key) for key in ("tokenizer", "teacher_tokenizer")}
        if missing["tokenizer"]:
            return
        try:
            self.tokenizer = config.instantiate(self.cfg.tokenizer)
        except Exception as err:
            self.add("tokenizer", f"cannot build the tokenizer ({_short(err)})")
            return
        v_tok = getattr(self.tokenizer, "vocab_size", None)
        v_s = model_vocab(self.models.get("model"))
        if isinstance(v_tok, int) and v_s is not None and v_tok > v_s:
            self.add(
                "tokenizer",
                f"the tokenizer has {v_tok} ids but the student embeds only {v_s} (model.vocab_size); "
                "ids >= that would index out of range",
            )
        if self.cfg.get("teacher_tokenizer") is None or missing["teacher_tokenizer"]:
            return
        try:
            teacher_tok = config.instantiate(self.cfg.teacher_tokenizer)
        except Exception as err:
            self.add("teacher_tokenizer", f"cannot build the tokenizer ({_short(err)})")
            return
        from tad_torchtune.data.vocab import check_vocab_alignment

        report = check_vocab_alignment(
            teacher_tok,
            self.tokenizer,
            raise_on_mismatch=False,
            teacher_name="teacher_tokenizer",
            student_name="tokenizer",
        )
        ok = getattr(report, "ok", None)
        if ok is False or (ok is None and getattr(report, "num_mismatched", 0)):
            summary = report.summary() if hasattr(report, "summary") else str(report)
            self.add("teacher_tokenizer", f"vocabulary mismatch between teacher and student: {summary.splitlines()[0]}")

    def _missing_tokenizer_files(self, key: str) -> bool:
        """Report each file argument of tokenizer node ``key`` that does not exist; True if any is missing."""
        node = self.cfg.get(key)
        if node is None:
            return False
        found = False
        for arg in ("path", "merges_file", "special_tokens_path", "tokenizer_json_path", "tokenizer_config_json_path"):
            value = node.get(arg)
            if isinstance(value, str) and not Path(value).exists():
                side = "student" if key == "tokenizer" else "teacher"
                self.add(
                    f"{key}.{arg}",
                    f"{value} does not exist: download the {side} model first (`tune download <repo> --output-dir "
                    f"<dir>`, the command is in the config's header) or point {key}.{arg} at its tokenizer file; "
                    "until then the teacher/student vocabulary check cannot run",
                )
                found = True
        return found

    # --- data ---------------------------------------------------------------------------------------
    def data(self) -> None:
        from torchtune import config

        if not self.check_data or self.tokenizer is None or self.cfg.get("dataset") is None:
            return
        if any(p.key.startswith("dataset") for p in self.problems):
            return
        ds_cfg = self.cfg.dataset
        try:
            parts = [
                config.instantiate(c, self.tokenizer) for c in (ds_cfg if isinstance(ds_cfg, ListConfig) else [ds_cfg])
            ]
            n = sum(len(p) for p in parts)
            self.dataset_parts = parts
        except StopIteration:  # HF datasets' json/csv builders on a source without records
            files = _get(self.cfg, "dataset.data_files")
            self.add("dataset", f"cannot build the dataset: its source {files or ''} holds no records (empty file?)")
            return
        except Exception as err:
            self.add("dataset", f"cannot build the dataset ({_short(err)})")
            return
        if getattr(self, "manifest", None) is not None and not any(p.key == "teacher_cache" for p in self.problems):
            from torch.utils.data import ConcatDataset

            from tad_torchtune.offline.teacher_cache import TeacherCacheError, check_compatible, corpus_fingerprint

            ds = parts[0] if len(parts) == 1 else ConcatDataset(parts)
            try:
                check_compatible(self.manifest, where="", num_sequences=n, corpus=corpus_fingerprint(ds))
            except TeacherCacheError as err:
                self.add("teacher_cache", str(err))
        bs, accum = self.cfg.get("batch_size"), self.cfg.get("gradient_accumulation_steps")
        if n == 0:
            self.add("dataset", "is empty (0 samples)")
        elif isinstance(bs, int) and isinstance(accum, int) and bs >= 1 and accum >= 1:
            need = bs * accum * self.world_size
            if n < need:
                self.add(
                    "dataset",
                    f"has {n} samples but one optimizer step needs {need} (batch_size={bs} x "
                    f"gradient_accumulation_steps={accum} x {self.world_size} process(es)); add data or shrink "
                    "the batch",
                )

    # --- output and resume --------------------------------------------------------------------------------
    def output_dir(self) -> None:
        out = self.cfg.get("output_dir")
        if out is None:
            self.add("output_dir", "is required")
            return
        path = Path(str(out))
        if path.exists() and not path.is_dir():
            self.add("output_dir", f"{path} exists and is not a folder")
            return
        from tad_torchtune.reliability.run_identity import RunLock

        holder = RunLock.holder(path) if self.check_lock else None
        if holder is not None:
            self.add(
                "output_dir",
                f"{path} is in use by another run ({holder}); wait for it to end, stop it, or use another output_dir",
            )
            return
        probe_dir = path
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            self.add("output_dir", f"{path} cannot be created: {probe_dir} is a file, not a folder")
            return
        try:
            fd, name = tempfile.mkstemp(prefix=".tad_write_probe_", dir=probe_dir)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            where = "" if probe_dir == path else f" (its nearest existing parent {probe_dir})"
            self.add("output_dir", f"{path}{where} is not writable ({err.strerror})")

    def resume(self) -> None:
        """Which checkpoints this run may use: its own (resume) or none (a new run in a clean folder)."""
        from tad_torchtune.checkpoint.manifest import read_run_record, verify_manifest
        from tad_torchtune.checkpoint.steps import FILES, find_latest_checkpoint, list_checkpoints

        resume = self.cfg.get("resume_from_checkpoint", False)
        root = Path(str(self.cfg.get("output_dir", "."))) / "checkpoints"
        existing = list_checkpoints(root)
        if resume in (False, None):
            if existing:
                runs = sorted({str((read_run_record(p) or {}).get("id", "unrecorded")) for p in existing})
                self.add(
                    "resume_from_checkpoint",
                    f"false (a new run), but {root} holds {len(existing)} checkpoint(s) of another run (run "
                    f"{', '.join(runs)}; newest {existing[-1].name}) that a new run would prune or later resume by "
                    "mistake; set resume_from_checkpoint=true to continue that run, or use a new output_dir, or move "
                    f"{root} aside",
                )
            return
        if not isinstance(resume, (bool, str)):
            self.add("resume_from_checkpoint", f"must be true, false or a checkpoint folder, got {resume!r}")
            return
        if resume is True:
            path = find_latest_checkpoint(root)
            if path is None:
                self.notes.append(
                    f"resume_from_checkpoint: true, but {root} has no complete checkpoint yet: the run starts at step 0"
                )
                return
            # Checkpoints written before runs were recorded belong to whichever run resumes them.
            runs = sorted({str(r["id"]) for r in map(read_run_record, existing) if r is not None and r.get("id")})
            if len(runs) > 1:
                self.add(
                    "resume_from_checkpoint",
                    f"true, but {root} holds checkpoints of {len(runs)} runs ({', '.join(runs)}): which one to "
                    "continue is ambiguous; give the folder to resume (resume_from_checkpoint=<path to step_N>) or "
                    "move the other run's checkpoints aside",
                )
                return
        else:
            path = Path(resume)
            if not path.is_dir():
                self.add("resume_from_checkpoint", f"{path} is not a checkpoint folder")
                return
            problem = verify_manifest(path, FILES)
            if problem is not None:
                self.add("resume_from_checkpoint", f"{path} is not a complete checkpoint: {problem}")
                return
        self._resume_files_and_config(path)

    def _resume_files_and_config(self, path: Path) -> None:
        """The resume checkpoint loads without running code, and was written with the same meaning-changing keys."""
        from tad_torchtune.checkpoint.manifest import read_run_record
        from tad_torchtune.checkpoint.safe_load import safe_load
        from tad_torchtune.checkpoint.steps import FILES
        from tad_torchtune.reliability.run_identity import compare_configs

        recipe_state = None
        for name in FILES:  # memory-mapped weights-only loads: cheap, and a pickle payload never runs
            try:
                obj = safe_load(path / name, mmap=name != "recipe_state.pt")
            except Exception as err:
                self.add("resume_from_checkpoint", f"{path / name} cannot be resumed from: {_short(err)}")
                return
            if name == "recipe_state.pt":
                recipe_state = obj
        record = read_run_record(path)
        old_ws = (record or {}).get("world_size")
        if old_ws is None and isinstance(recipe_state, dict):
            old_ws = recipe_state.get("world_size")
        if record is None or not isinstance(record.get("config"), dict):
            if old_ws is not None and old_ws != self.world_size:
                self.add(
                    "resume_from_checkpoint",
                    f"{path} was written by {old_ws} process(es), this run has {self.world_size}; resume with "
                    f"--nproc_per_node {old_ws}",
                )
            else:
                self.notes.append(f"{path} predates recorded run configs: the config was not compared with it")
            return
        new = OmegaConf.to_container(self.cfg, resolve=True)
        refused, changed = compare_configs(record["config"], new, old_ws, self.world_size)
        if refused:
            self.add(
                "resume_from_checkpoint",
                f"{path} (run {record.get('id')}) was written with a different run: {'; '.join(refused)}. These "
                "change what the run computes; restore the old values to resume, or start a new run in a new "
                "output_dir",
            )
        for line in changed:
            self.notes.append(f"resume: {line} (accepted)")


def model_vocab(model: Any) -> int | None:
    emb = getattr(model, "tok_embeddings", None)
    n = getattr(emb, "num_embeddings", None)
    return int(n) if n is not None else None


def _shapes_only(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint file without loading its data (safetensors header / mmap'd weights-only load)."""
    from tad_torchtune.checkpoint.safe_load import safe_load

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = safe_load(path, mmap=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


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
        print(f"config: {_short(err)}", file=sys.stderr)
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

    component = str(_get(cfg, "metric_logger._component_") or "")
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
