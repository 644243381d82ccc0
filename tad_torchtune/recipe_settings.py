"""The recipe's settings, parsed once into typed sections (``docs/recipe.md`` lists every key).

A ``knowledge_distillation_tad`` config has two kinds of keys. *Components* (``model``, ``tokenizer``,
``dataset``, ``optimizer``, ``kd_loss``, ...) are ``_component_`` nodes that torchtune's ``config.instantiate``
builds; they stay config nodes. *Settings* (batch geometry, loss weights, checkpointing, logging, the
``on_policy:`` section, ...) are plain values: :func:`parse_settings` reads them into a frozen
:class:`RecipeSettings`, applying the defaults and the type/range rules of :data:`SCHEMA` in one place.

``tad-tune validate`` reports :func:`settings_problems` (one line per bad value, the key named), and
:func:`key_problems` / :func:`component_problems` (keys and component arguments the recipe never reads); the recipe,
after validation passed, reads its settings from the same parse and never from the raw config. So a value the
validator accepts is exactly the value the recipe uses, and a default lives in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tad_torchtune.check_tools import one_line, suggest

if TYPE_CHECKING:
    from tad_torchtune.training.on_policy import OnPolicySettings

__all__ = [
    "BOOL_KEYS",
    "COMPONENT_KEYS",
    "RECIPE_KEYS",
    "SCHEMA",
    "CHOICE_KEYS",
    "FUSED_CHUNK_SIZE",
    "KNOWN_PEAKS",
    "CheckpointSettings",
    "LoggingSettings",
    "LoopSettings",
    "LossSettings",
    "Num",
    "RecipeSettings",
    "StudentSettings",
    "checked_settings",
    "component_problems",
    "fused_mode",
    "key_problems",
    "loss_weights",
    "parse_peak_flops",
    "parse_settings",
    "settings_problems",
    "uses_live_teacher",
]

# Every top-level key the knowledge_distillation_tad recipe reads (docs/recipe.md, docs/reliability.md).
RECIPE_KEYS = frozenset(
    """
    output_dir seed device dtype model teacher_model checkpointer teacher_checkpointer tokenizer teacher_tokenizer
    dataset batch_size shuffle collate_fn loss kd_loss ce_weight kd_weight kd_ratio cosine_weight hidden_layer_map
    freeze optimizer lr_scheduler gradient_accumulation_steps clip_grad_norm epochs max_steps_per_epoch
    save_every_n_steps keep_last_n_checkpoints resume_from_checkpoint enable_activation_checkpointing compile
    custom_sharded_layers metric_logger log_every_n_steps log_peak_memory_stats nonfinite_policy fused_loss
    fused_chunk_size log_flops peak_flops progress_bar on_policy teacher_cache
    """.split()
)
# Keys whose value is a ``_component_`` node that config.instantiate builds (``dataset`` may also be a list).
COMPONENT_KEYS = (
    "model teacher_model checkpointer teacher_checkpointer tokenizer teacher_tokenizer loss kd_loss optimizer "
    "lr_scheduler metric_logger"
).split()
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w]*)")  # ${name...}: a top-level key used as a variable


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclass(frozen=True)
class Num:
    """The type and range of one numeric config key (``None`` bound: unbounded on that side)."""

    integer: bool
    low: float | None = None
    low_strict: bool = False
    high: float | None = None
    required: bool = False
    hint: str = ""

    def problem(self, value: Any) -> str | None:
        """None when ``value`` fits, else the sentence saying what is wrong (the value included)."""
        kind = "an integer" if self.integer else "a number"
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.integer and isinstance(value, float))
        ):
            return f"must be {kind}, got {value!r}{self.hint}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}{self.hint}"
        below = self.low is not None and ((value <= self.low) if self.low_strict else (value < self.low))
        above = self.high is not None and value > self.high
        if (below or above) and self.low is not None and not self.low_strict and self.high is not None:
            return f"must be in [{_fmt(self.low)}, {_fmt(self.high)}], got {value!r}{self.hint}"
        if below:
            return f"must be {'>' if self.low_strict else '>='} {_fmt(self.low)}, got {value!r}{self.hint}"
        if above:
            return f"must be <= {_fmt(self.high)}, got {value!r}{self.hint}"
        return None


# Every numeric key the recipe reads, typed: one rule checks them all (docs/recipe.md lists the same ranges).
# Component arguments (dotted keys) are checked when their section is configured.
SCHEMA: dict[str, Num] = {
    "seed": Num(True, 0, high=2**32 - 1, hint="; use an integer such as 0, or null for a random seed"),
    "batch_size": Num(True, 1, required=True),
    "epochs": Num(True, 1, required=True),
    "gradient_accumulation_steps": Num(True, 1, required=True),
    "max_steps_per_epoch": Num(True, 1),
    "save_every_n_steps": Num(True, 1),
    "keep_last_n_checkpoints": Num(True, 1),
    "log_every_n_steps": Num(True, 1),
    "fused_chunk_size": Num(
        True, 1, hint="; positions per slice of the fused loss, e.g. 1024, or the sequence length for one teacher pass"
    ),
    "clip_grad_norm": Num(False, 0, low_strict=True, hint="; use e.g. 1.0, or null for no clipping"),
    "ce_weight": Num(False, 0),
    "kd_weight": Num(False, 0),
    "cosine_weight": Num(False, 0),
    "kd_ratio": Num(False, 0, high=1),
    # Above 10 no optimizer we know of converges (and 1e39 overflows fp32): almost surely a typo.
    "optimizer.lr": Num(False, 0, low_strict=True, high=10.0, hint="; typical values are 1e-6 to 1e-3"),
    "optimizer.weight_decay": Num(False, 0),
    "optimizer.eps": Num(False, 0, low_strict=True),
    "optimizer.momentum": Num(False, 0),
    "loss.num_output_chunks": Num(True, 1),
    "kd_loss.num_output_chunks": Num(True, 1),
    "kd_loss.temperature": Num(False, 0, low_strict=True),
    "kd_loss.beta": Num(False, 0, low_strict=True),
    "kd_loss.top_k": Num(True, 1),
    "kd_loss.chunk_size": Num(True, 1),
    "lr_scheduler.num_warmup_steps": Num(True, 0),
    "tokenizer.max_seq_len": Num(True, 1),
}
BOOL_KEYS = (
    "shuffle",
    "compile",
    "enable_activation_checkpointing",
    "log_peak_memory_stats",
    "log_flops",
    "progress_bar",
)
# Keys with a fixed set of spellings: key -> (accepted values, default, how the message spells them).
CHOICE_KEYS: dict[str, tuple[tuple[str, ...], str | None, str]] = {
    "dtype": (("fp32", "bf16"), None, "fp32 or bf16"),
    "nonfinite_policy": (("skip", "stop"), "skip", "'skip' or 'stop'"),
    "fused_loss": (("auto", "true", "false"), "auto", "auto, true or false"),
}
#: Default positions per slice of the fused loss when kd_loss is a plain divergence (``fused_chunk_size``; a
#: ``FusedLinear*`` kd_loss brings its own ``chunk_size``).
FUSED_CHUNK_SIZE = 1024


# Dense bf16 peaks of common accelerators (vendor datasheets, without sparsity), FLOP/s.
KNOWN_PEAKS = {"h100-sxm": 989e12, "h100-pcie": 756e12, "h200": 989e12, "a100": 312e12}


def parse_peak_flops(value: Any, key: str = "peak_flops") -> float | None:
    """A device's peak FLOP/s from a config value.

    Args:
        value: ``None`` (measure it: returns None), a positive number (``989e12``; a numeric string such as
            ``"989e12"`` too), or a :data:`KNOWN_PEAKS` name (``h100-sxm``; case and ``_``/``-`` are free).
        key (str): the config key, for the error message. Default: ``"peak_flops"``

    Returns:
        float | None: FLOP/s, or None when ``value`` is None.

    Raises:
        ValueError: a bool, a non-positive or non-finite number, or a string that is neither a number nor a
            known name (the message names ``key``, the value and the fix).
    """
    if value is None:
        return None
    fix = (
        f"set {key} to the device's dense peak in FLOP/s (e.g. 989e12), one of {sorted(KNOWN_PEAKS)}, "
        "or null to measure it with a matmul probe at setup"
    )
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a FLOP/s value; {fix}")
    if isinstance(value, str):
        name = value.strip().lower().replace("_", "-")
        if name in KNOWN_PEAKS:
            return KNOWN_PEAKS[name]
        try:
            peak = float(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is neither a number nor a known device; {fix}") from None
    else:
        try:
            peak = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a FLOP/s value; {fix}") from None
    if not math.isfinite(peak) or peak <= 0:
        raise ValueError(f"{key}={value!r} must be a finite FLOP/s value > 0; {fix}")
    return peak


def uses_live_teacher(kd_weight: float, cosine_weight: float, teacher_cache: Any) -> bool:
    """Whether the recipe loads the teacher: a divergence not served by ``teacher_cache``, or a cosine term."""
    return (kd_weight != 0 and teacher_cache is None) or cosine_weight != 0


@dataclass(frozen=True)
class LoopSettings:
    """The training loop: how many samples make a step, how many steps make the run.

    Attributes:
        epochs (int): passes over the dataset.
        batch_size (int): samples per micro-batch and rank.
        gradient_accumulation_steps (int): micro-batches per optimizer step.
        max_steps_per_epoch (int | None): optimizer steps per epoch at most (None: the whole dataset).
        shuffle (bool): shuffle the dataset each epoch (seeded).
        collate_fn (str): dotted path of the collate function.
        clip_grad_norm (float | None): global gradient-norm clip (None: no clipping).
    """

    epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    max_steps_per_epoch: int | None = None
    shuffle: bool = True
    collate_fn: str = "torchtune.data.padded_collate_sft"
    clip_grad_norm: float | None = None


@dataclass(frozen=True)
class LossSettings:
    """How the loss is assembled: ``ce_weight · CE + kd_weight · D + cosine_weight · cosine`` (``docs/recipe.md``).

    Attributes:
        ce_weight (float): weight of the cross-entropy term (``1 - kd_ratio`` when ``kd_ratio`` is set).
        kd_weight (float): weight of the divergence ``kd_loss`` (``kd_ratio`` when it is set).
        cosine_weight (float): weight of the hidden-state cosine term (needs ``hidden_layer_map``).
        fused_mode (str): ``"auto"``, ``"true"`` or ``"false"`` (``fused_loss``).
        fused_chunk_size (int): positions per slice of the fused loss.
        teacher_cache (str | None): folder of a sparse teacher cache that replaces the live teacher's divergence.
    """

    ce_weight: float = 1.0
    kd_weight: float = 1.0
    cosine_weight: float = 0.0
    fused_mode: str = "auto"
    fused_chunk_size: int = FUSED_CHUNK_SIZE
    teacher_cache: str | None = None

    @property
    def uses_live_teacher(self) -> bool:
        """Whether the teacher model is loaded (see :func:`uses_live_teacher`)."""
        return uses_live_teacher(self.kd_weight, self.cosine_weight, self.teacher_cache)


@dataclass(frozen=True)
class CheckpointSettings:
    """Step checkpoints and resume (``docs/reliability.md``).

    Attributes:
        save_every_n_steps (int | None): a resumable checkpoint every N optimizer steps (None: only at the end).
        keep_last_n_checkpoints (int | None): step checkpoints kept; older ones are pruned (None: keep all).
        resume_from_checkpoint (bool | str): ``True``: resume from the newest complete checkpoint in
            ``output_dir/checkpoints``; a path: resume from that ``step_N`` folder; ``False``: a new run.
    """

    save_every_n_steps: int | None = None
    keep_last_n_checkpoints: int | None = 2
    resume_from_checkpoint: bool | str = False


@dataclass(frozen=True)
class LoggingSettings:
    """What the run reports.

    Attributes:
        log_every_n_steps (int): metrics are logged every N optimizer steps.
        progress_bar (bool): a tqdm bar on rank 0.
        log_peak_memory_stats (bool): log the accelerator's peak memory.
        log_flops (bool): log FLOPs per token, FLOP/s and MFU.
        peak_flops (float | None): the device's peak FLOP/s for MFU (None: measured with a matmul probe).
    """

    log_every_n_steps: int = 1
    progress_bar: bool = True
    log_peak_memory_stats: bool = True
    log_flops: bool = True
    peak_flops: float | None = None


@dataclass(frozen=True)
class StudentSettings:
    """How the student is built for training.

    Attributes:
        compile (bool): ``torch.compile`` the student's layers (and the fused loss's chunk).
        enable_activation_checkpointing (bool): recompute layer activations in the backward pass.
        freeze (tuple[str, ...]): regular expressions; matching parameters get no gradient.
        custom_sharded_layers (tuple[str, ...] | None): extra modules FSDP2 shards on their own.
    """

    compile: bool = False
    enable_activation_checkpointing: bool = False
    freeze: tuple[str, ...] = ()
    custom_sharded_layers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RecipeSettings:
    """Every setting of a ``knowledge_distillation_tad`` config, typed, with the defaults applied.

    Attributes:
        output_dir (Path): the run's folder (checkpoints, logs, the resolved config).
        dtype (str): ``"fp32"`` or ``"bf16"``.
        device (str | None): ``cpu``, ``cuda``, ... (None: torchtune picks).
        seed (int | None): the run's seed (None: drawn at start-up).
        nonfinite_policy (str): ``"skip"`` or ``"stop"`` on a non-finite loss or gradient.
        loop, loss, checkpointing, logging, student: the sections above.
        on_policy (OnPolicySettings): the ``on_policy:`` section (``docs/on_policy.md``).
    """

    output_dir: Path
    dtype: str
    loop: LoopSettings
    loss: LossSettings
    device: str | None = None
    seed: int | None = None
    nonfinite_policy: str = "skip"
    checkpointing: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    student: StudentSettings = field(default_factory=StudentSettings)
    on_policy: OnPolicySettings | None = None


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container (list items as ``key[i]``)."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix, node)]


def _choice(key: str, value: Any) -> str:
    # YAML and the command line give booleans for `fused_loss: true`; the setting is its spelling.
    return str(value).strip().lower() if key == "fused_loss" else str(value)


def key_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, message) for every top-level key the recipe never reads (the closest of :data:`RECIPE_KEYS` named).

    A key that an interpolation elsewhere refers to (``${assets_dir}``) is a variable, not a mistake.

    Args:
        cfg (DictConfig): the recipe config.

    Returns:
        list[tuple[str, str]]: e.g. ``[("epohcs", "unknown config key; did you mean 'epochs'?")]``.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    referenced = set(_INTERPOLATION.findall(OmegaConf.to_yaml(OmegaConf.create(raw))))
    out: list[tuple[str, str]] = []
    for key in cfg.keys():
        key = str(key)
        if key in RECIPE_KEYS or key in referenced:
            continue
        out.append((key, f"unknown config key{suggest(key, RECIPE_KEYS) or ' (the recipe never reads it)'}"))
    return out


def component_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, message) for every component node (:data:`COMPONENT_KEYS`, ``dataset``) that is not a mapping with an
    importable ``_component_``, and for every argument its builder does not take (closest argument named).

    Args:
        cfg (DictConfig): the recipe config.

    Returns:
        list[tuple[str, str]]: e.g. ``[("kd_loss.topk", "tad_torchtune.TADLoss has no argument 'topk'; ...")]``.
    """
    import inspect

    from torchtune.config._utils import _get_component_from_path

    nodes = [(k, cfg.get(k)) for k in COMPONENT_KEYS]
    ds = cfg.get("dataset")
    nodes += [(f"dataset[{i}]", d) for i, d in enumerate(ds)] if isinstance(ds, ListConfig) else [("dataset", ds)]
    out: list[tuple[str, str]] = []
    for key, node in nodes:
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_component_" not in node:
            out.append((key, "expected a mapping with a _component_ (dotted path of a builder or class)"))
            continue
        path = str(node["_component_"])
        try:
            target = _get_component_from_path(path)
        except Exception as err:
            out.append((f"{key}._component_", f"cannot import {path!r} ({one_line(err)})"))
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
                hint = suggest(str(arg), valid) or f" (it takes {', '.join(valid)})"
                out.append((f"{key}.{arg}", f"{path} has no argument {arg!r}{hint}"))
    return out


def settings_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, message) for every setting whose value is wrong: empty when :func:`parse_settings` will succeed.

    Checks: every number anywhere in the config is finite; the keys of :data:`SCHEMA` have their type and range;
    :data:`BOOL_KEYS` are booleans; :data:`CHOICE_KEYS` are spelled as accepted; ``kd_ratio`` agrees with
    ``ce_weight``/``kd_weight`` when both are given; ``peak_flops`` is a FLOP/s value or a known device; the
    ``on_policy:`` section's values.

    Args:
        cfg (DictConfig): the recipe config (interpolations resolvable).

    Returns:
        list[tuple[str, str]]: e.g. ``[("batch_size", "must be >= 1, got 0")]``.
    """
    from tad_torchtune.training.on_policy import settings_problems as on_policy_problems

    out: list[tuple[str, str]] = []
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, float) and not math.isfinite(value) and key not in SCHEMA:
            out.append((key, f"must be a finite number, got {value!r}"))
    for key, rule in SCHEMA.items():
        section = key.split(".", 1)[0]
        if "." in key and not isinstance(cfg.get(section), DictConfig):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            if rule.required:
                out.append((key, "is required"))
            continue
        problem = rule.problem(value)
        if problem is not None:
            out.append((key, problem))
    for key in BOOL_KEYS:
        value = cfg.get(key)
        if value is not None and not isinstance(value, bool):
            out.append((key, f"must be true or false, got {key}={value!r}"))
    for key, (accepted, default, spelled) in CHOICE_KEYS.items():
        value = _or_default(cfg, key, default)
        if _choice(key, value) not in accepted:
            out.append((key, f"must be {spelled}, got {value!r}{suggest(str(value), accepted)}"))
    out += _loss_weight_problems(cfg)
    if cfg.get("peak_flops") is not None:
        try:
            parse_peak_flops(cfg.get("peak_flops"), "peak_flops")
        except ValueError as err:
            out.append(("peak_flops", str(err)))
    for key, message in on_policy_problems(cfg.get("on_policy")):
        out.append((f"on_policy.{key}" if key else "on_policy", message))
    return out


def _loss_weight_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """torchtune's ``kd_ratio`` r means (ce_weight, kd_weight) = (1 - r, r): refused when both disagree."""
    r = cfg.get("kd_ratio", None)
    has_weights = "ce_weight" in cfg or "kd_weight" in cfg
    if r is None or not has_weights or Num(False, 0, high=1).problem(r) is not None:
        return []
    ce_w, kd_w = _or_default(cfg, "ce_weight", 1.0), _or_default(cfg, "kd_weight", 1.0)
    if any(Num(False, 0).problem(w) is not None for w in (ce_w, kd_w)):
        return []
    if math.isclose(ce_w, 1 - r) and math.isclose(kd_w, r):
        return []
    return [
        (
            "kd_ratio",
            f"kd_ratio={r} means ce_weight={1 - r:g}, kd_weight={r:g}, but the config also sets ce_weight={ce_w}, "
            f"kd_weight={kd_w}; give either kd_ratio or ce_weight/kd_weight",
        )
    ]


def loss_weights(cfg: DictConfig) -> tuple[float, float]:
    """``(ce_weight, kd_weight)`` as the run uses them: torchtune's ``kd_ratio`` r means ``(1 - r, r)``.

    Args:
        cfg (DictConfig): a recipe config whose weights :func:`settings_problems` accepts.

    Returns:
        tuple[float, float]: the CE and divergence weights.
    """
    if cfg.get("kd_ratio", None) is not None:
        return 1.0 - float(cfg.kd_ratio), float(cfg.kd_ratio)
    return float(_or_default(cfg, "ce_weight", 1.0)), float(_or_default(cfg, "kd_weight", 1.0))


def fused_mode(cfg: DictConfig) -> str:
    """``fused_loss`` as ``"auto"``, ``"true"`` or ``"false"`` (YAML gives booleans; null means auto)."""
    return _choice("fused_loss", _or_default(cfg, "fused_loss", "auto"))


def _or_default(cfg: DictConfig, key: str, default: Any) -> Any:
    # `key: null` means the default where null has no meaning of its own (unlike keep_last_n_checkpoints: null)
    value = cfg.get(key, None)
    return default if value is None else value


def _resume_value(value: Any) -> bool | str:
    # validation's resume check has refused anything but a bool, null or a folder path
    return value if isinstance(value, bool) else (False if value is None else str(value))


def parse_settings(cfg: DictConfig) -> RecipeSettings:
    """The config's settings, typed and with defaults (components are left to ``config.instantiate``).

    Args:
        cfg (DictConfig): the recipe config.

    Returns:
        RecipeSettings: the settings the recipe runs with.

    Raises:
        ValueError: one line per problem :func:`settings_problems` finds (``tad-tune validate`` lists them).
    """
    settings, problems = checked_settings(cfg)
    if settings is None:
        raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
    return settings


def checked_settings(cfg: DictConfig) -> tuple[RecipeSettings | None, list[tuple[str, str]]]:
    """:func:`settings_problems` and, when there are none, the settings: one check for validate and the recipe.

    Args:
        cfg (DictConfig): the recipe config.

    Returns:
        tuple[RecipeSettings | None, list[tuple[str, str]]]: the settings (None when a value is wrong) and the
        problems (empty when the settings exist).
    """
    problems = settings_problems(cfg)
    return (None, problems) if problems else (_typed_settings(cfg), [])


def _typed_settings(cfg: DictConfig) -> RecipeSettings:
    """The settings of a config whose values :func:`settings_problems` accepted."""
    from tad_torchtune.training.on_policy import OnPolicySettings

    ce_weight, kd_weight = loss_weights(cfg)
    clip = cfg.get("clip_grad_norm", None)
    teacher_cache = cfg.get("teacher_cache", None)
    freeze = cfg.get("freeze", None) or []
    sharded = cfg.get("custom_sharded_layers", None)
    return RecipeSettings(
        output_dir=Path(str(cfg.output_dir)),
        dtype=str(cfg.dtype),
        device=None if cfg.get("device") is None else str(cfg.device),
        seed=cfg.get("seed", None),
        nonfinite_policy=str(_or_default(cfg, "nonfinite_policy", "skip")),
        loop=LoopSettings(
            epochs=int(cfg.epochs),
            batch_size=int(cfg.batch_size),
            gradient_accumulation_steps=int(cfg.gradient_accumulation_steps),
            max_steps_per_epoch=cfg.get("max_steps_per_epoch", None),
            shuffle=bool(_or_default(cfg, "shuffle", True)),
            collate_fn=str(_or_default(cfg, "collate_fn", LoopSettings.collate_fn)),
            clip_grad_norm=None if clip is None else float(clip),
        ),
        loss=LossSettings(
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            cosine_weight=float(_or_default(cfg, "cosine_weight", 0.0)),
            fused_mode=fused_mode(cfg),
            fused_chunk_size=int(_or_default(cfg, "fused_chunk_size", LossSettings.fused_chunk_size)),
            teacher_cache=None if teacher_cache is None else str(teacher_cache),
        ),
        checkpointing=CheckpointSettings(
            save_every_n_steps=cfg.get("save_every_n_steps", None),
            keep_last_n_checkpoints=cfg.get("keep_last_n_checkpoints", 2),
            resume_from_checkpoint=_resume_value(_or_default(cfg, "resume_from_checkpoint", False)),
        ),
        logging=LoggingSettings(
            log_every_n_steps=int(_or_default(cfg, "log_every_n_steps", 1)),
            progress_bar=bool(_or_default(cfg, "progress_bar", True)),
            log_peak_memory_stats=bool(_or_default(cfg, "log_peak_memory_stats", True)),
            log_flops=bool(_or_default(cfg, "log_flops", True)),
            peak_flops=parse_peak_flops(cfg.get("peak_flops", None), "peak_flops"),
        ),
        student=StudentSettings(
            compile=bool(_or_default(cfg, "compile", False)),
            enable_activation_checkpointing=bool(_or_default(cfg, "enable_activation_checkpointing", False)),
            freeze=tuple(str(p) for p in freeze),
            custom_sharded_layers=None if sharded is None else tuple(str(n) for n in sharded),
        ),
        on_policy=OnPolicySettings.from_config(cfg.get("on_policy", None)),
    )
