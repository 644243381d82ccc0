"""Start-up checks of checkpoints (``tad-tune validate``): the weights a run loads, and the step checkpoint it resumes.

- :func:`checkpointer_problems`: every file ``checkpointer`` / ``teacher_checkpointer`` names exists, loads
  without running code, and (torchtune format) holds exactly the model's keys and shapes; read from headers
  and memory maps, so nothing is loaded into memory.
- :func:`resume_problems`: which step checkpoints this run may use: its own (resume) or none (a new run in a
  clean folder); the one it resumes is complete, safe to load, of one run, and written with the same
  meaning-changing keys (:func:`~tad_torchtune.reliability.run_identity.compare_configs`).

Both return ``(key, message)`` pairs; :mod:`tad_torchtune.validate` runs them in order with the other checks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from tad_torchtune.check_tools import one_line
from tad_torchtune.checkpoint.manifest import read_run_record, verify_manifest
from tad_torchtune.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from tad_torchtune.checkpoint.steps import FILES, find_latest_checkpoint, list_checkpoints

__all__ = ["checkpointer_problems", "resume_problems", "shapes_only"]


def checkpointer_problems(
    cfg: DictConfig, models: Mapping[str, nn.Module], *, uses_teacher: bool, reported: Collection[str] = ()
) -> list[tuple[str, str]]:
    """The weights the run starts from: ``checkpointer`` (student) and, when the teacher is used,
    ``teacher_checkpointer``.

    Args:
        cfg (DictConfig): the recipe config.
        models (Mapping[str, nn.Module]): ``"model"`` / ``"teacher_model"`` built on the meta device (those that
            built); a torchtune-format checkpoint is compared with their state dict's keys and shapes.
        uses_teacher (bool): whether the run loads the teacher (else ``teacher_checkpointer`` is not checked).
        reported (Collection[str]): keys already reported; a checkpointer with a reported key (``checkpointer``,
            ``checkpointer.x``) is not checked further. Default: ()

    Returns:
        list[tuple[str, str]]: (key, message) per problem, e.g. ``("checkpointer.checkpoint_files", "missing
        under /ckpt: model.pt")``.
    """
    pairs = [("checkpointer", "model")] + ([("teacher_checkpointer", "teacher_model")] if uses_teacher else [])
    out: list[tuple[str, str]] = []
    for key, model_key in pairs:
        node = cfg.get(key)
        if node is None:
            if key == "teacher_checkpointer":
                out.append((key, "kd_weight or cosine_weight is non-zero but no teacher_checkpointer is configured"))
            continue
        if any(k.startswith(f"{key}.") or k == key for k in reported):
            continue
        ckpt_dir = Path(str(node.get("checkpoint_dir", "")))
        if not ckpt_dir.is_dir():
            out.append((f"{key}.checkpoint_dir", f"{ckpt_dir} is not a folder"))
            continue
        files = node.get("checkpoint_files")
        if not isinstance(files, ListConfig):
            continue  # torchtune's {filename_format, max_filename} form: torchtune checks it itself
        missing = [str(f) for f in files if not (ckpt_dir / str(f)).is_file()]
        if missing:
            out.append((f"{key}.checkpoint_files", f"missing under {ckpt_dir}: {', '.join(missing)}"))
            continue
        component = str(node.get("_component_", ""))
        model = models.get(model_key)
        if component.endswith(("FullModelTorchTuneCheckpointer", "FullModelMetaCheckpointer")) and model is not None:
            problem = _weights_problem(ckpt_dir, [str(f) for f in files], model, model_key, component.endswith("Meta"))
            if problem is not None:
                out.append((f"{key}.checkpoint_files", problem))
        elif component.endswith("HFCheckpointer") and not (ckpt_dir / "config.json").is_file():
            out.append((f"{key}.checkpoint_dir", f"{ckpt_dir} has no config.json (an HF checkpoint needs it)"))
    return out


def _weights_problem(ckpt_dir: Path, files: list[str], model: nn.Module, model_key: str, meta: bool) -> str | None:
    """Why the files cannot be read safely, or (torchtune format) do not hold ``model``'s keys and shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            sd = shapes_only(ckpt_dir / name)
        except UnsafeCheckpointError as err:
            return str(err)
        except Exception as err:
            return f"cannot read {ckpt_dir / name} ({one_line(err)})"
        shapes.update(sd)
    if meta:
        return None  # Meta key names are converted by torchtune; existence and safety were checked
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if not (missing or extra or wrong):
        return None
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: file {shapes[k]} vs model {expected[k]}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[0]}")
    return f"{ckpt_dir} does not match {model_key}: {'; '.join(parts)} (wrong checkpoint or wrong model dims)"


def shapes_only(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint file without loading its data (safetensors header / mmap'd weights-only load).

    Raises:
        UnsafeCheckpointError: the file is a pickle that would run code when loaded.
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = safe_load(path, mmap=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def resume_problems(cfg: DictConfig, world_size: int, notes: list[str]) -> list[tuple[str, str]]:
    """Which step checkpoints this run may use, by ``resume_from_checkpoint``: none (``false``: a new run, refused
    in a folder holding another run's checkpoints), the latest of its own (``true``), or the given folder.

    ``true`` with no checkpoint yet is fine (a note: the run starts at step 0).

    Args:
        cfg (DictConfig): the recipe config (``output_dir``, ``resume_from_checkpoint``; the whole config is
            compared with the one the checkpoint recorded).
        world_size (int): processes the run will use.
        notes (list[str]): receives what was accepted but is worth saying (benign config changes).

    Returns:
        list[tuple[str, str]]: at most one ``("resume_from_checkpoint", message)``.
    """
    resume = cfg.get("resume_from_checkpoint", False)
    root = Path(str(cfg.get("output_dir", "."))) / "checkpoints"
    existing = list_checkpoints(root)
    key = "resume_from_checkpoint"
    if resume in (False, None):
        if not existing:
            return []
        runs = sorted({str((read_run_record(p) or {}).get("id", "unrecorded")) for p in existing})
        return [
            (
                key,
                f"false (a new run), but {root} holds {len(existing)} checkpoint(s) of another run (run "
                f"{', '.join(runs)}; newest {existing[-1].name}) that a new run would prune or later resume by "
                "mistake; set resume_from_checkpoint=true to continue that run, or use a new output_dir, or move "
                f"{root} aside",
            )
        ]
    if not isinstance(resume, (bool, str)):
        return [(key, f"must be true, false or a checkpoint folder, got {resume!r}")]
    if resume is True:
        path = find_latest_checkpoint(root)
        if path is None:
            notes.append(
                f"resume_from_checkpoint: true, but {root} has no complete checkpoint yet: the run starts at step 0"
            )
            return []
        # Checkpoints written before runs were recorded belong to whichever run resumes them.
        runs = sorted({str(r["id"]) for r in map(read_run_record, existing) if r is not None and r.get("id")})
        if len(runs) > 1:
            return [
                (
                    key,
                    f"true, but {root} holds checkpoints of {len(runs)} runs ({', '.join(runs)}): which one to "
                    "continue is ambiguous; give the folder to resume (resume_from_checkpoint=<path to step_N>) or "
                    "move the other run's checkpoints aside",
                )
            ]
    else:
        path = Path(resume)
        if not path.is_dir():
            return [(key, f"{path} is not a checkpoint folder")]
        problem = verify_manifest(path, FILES)
        if problem is not None:
            return [(key, f"{path} is not a complete checkpoint: {problem}")]
    return _resume_fit_problems(cfg, path, world_size, notes)


def _resume_fit_problems(cfg: DictConfig, path: Path, world_size: int, notes: list[str]) -> list[tuple[str, str]]:
    """The resume checkpoint loads without running code, and was written with the same meaning-changing keys."""
    from tad_torchtune.reliability.run_identity import compare_configs

    key = "resume_from_checkpoint"
    recipe_state: Any = None
    for name in FILES:  # memory-mapped weights-only loads: cheap, and a pickle payload never runs
        try:
            obj = safe_load(path / name, mmap=name != "recipe_state.pt")
        except Exception as err:
            return [(key, f"{path / name} cannot be resumed from: {one_line(err)}")]
        if name == "recipe_state.pt":
            recipe_state = obj
    record = read_run_record(path)
    old_ws = (record or {}).get("world_size")
    if old_ws is None and isinstance(recipe_state, dict):
        old_ws = recipe_state.get("world_size")
    if record is None or not isinstance(record.get("config"), dict):
        if old_ws is not None and old_ws != world_size:
            return [
                (
                    key,
                    f"{path} was written by {old_ws} process(es), this run has {world_size}; resume with "
                    f"--nproc_per_node {old_ws}",
                )
            ]
        notes.append(f"{path} predates recorded run configs: the config was not compared with it")
        return []
    new = OmegaConf.to_container(cfg, resolve=True)
    refused, changed = compare_configs(record["config"], new, old_ws, world_size)
    notes.extend(f"resume: {line} (accepted)" for line in changed)
    if not refused:
        return []
    return [
        (
            key,
            f"{path} (run {record.get('id')}) was written with a different run: {'; '.join(refused)}. These "
            "change what the run computes; restore the old values to resume, or start a new run in a new "
            "output_dir",
        )
    ]
