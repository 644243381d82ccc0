"""Start-up checks of ``teacher_cache`` (``tad-tune validate``, ``docs/teacher_cache.md``).

- :func:`cache_problems`: the cache folder is complete and can serve this run: a kd_loss it holds rows for
  (TADLoss, ForwardKLLoss) at the student's vocabulary, ``top_k`` <= its K_max, its temperature; no cosine
  term (a cache holds no hidden states), no ``fused_loss: true`` (cached rows meet chunked logits).
- :func:`corpus_problems`: the datasets the run builds are the corpus the cache was written for (sequence
  count and fingerprint).

Both return ``(key, message)`` pairs; :mod:`tad_torchtune.validate` runs them in order with the other checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from tad_torchtune.check_tools import component_default
from tad_torchtune.offline.teacher_cache import TeacherCacheError, check_compatible, corpus_fingerprint, read_manifest
from tad_torchtune.recipe_settings import fused_mode

__all__ = ["cache_problems", "corpus_problems"]


def cache_problems(
    cfg: DictConfig, *, student_vocab: int | None, loss_weight: Callable[[str], float], notes: list[str]
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Whether ``teacher_cache`` (when set) is readable, complete and able to serve this run's losses.

    Args:
        cfg (DictConfig): the recipe config (``teacher_cache``, ``kd_loss``, ``fused_loss``).
        student_vocab (int | None): ids the student embeds (None: not compared).
        loss_weight (Callable[[str], float]): ``"kd_weight"`` / ``"cosine_weight"`` -> that weight as the recipe
            uses it (``kd_ratio`` applied); called only where a check needs it, so a weight that cannot be read
            fails only those checks.
        notes (list[str]): receives a note when the cache is set but never read (``kd_weight: 0``).

    Returns:
        tuple[dict[str, Any] | None, list[tuple[str, str]]]: the cache's manifest (None when unset or unreadable;
        :func:`corpus_problems` takes it) and (key, message) per problem.
    """
    from torchtune.config._utils import _get_component_from_path

    from tad_torchtune.losses import ForwardKLLoss, TADLoss

    path = cfg.get("teacher_cache")
    if path is None:
        return None, []
    try:
        manifest = read_manifest(str(path))
    except TeacherCacheError as err:
        return None, [("teacher_cache", str(err))]
    out: list[tuple[str, str]] = []
    if loss_weight("cosine_weight") != 0:
        out.append(("teacher_cache", "cosine_weight needs the teacher's hidden states, which a cache does not hold"))
    if fused_mode(cfg) == "true":
        out.append(("fused_loss", "true, but teacher_cache is set: the cached rows meet chunked logits; use auto"))
    node = cfg.get("kd_loss")
    if node is None or loss_weight("kd_weight") == 0:
        notes.append("teacher_cache is set but kd_weight is 0 (or no kd_loss): the cache is not read")
        return manifest, out
    try:
        kind = _get_component_from_path(str(node["_component_"]))
    except Exception:
        return manifest, out  # the component check reported it
    if not (isinstance(kind, type) and issubclass(kind, (TADLoss, ForwardKLLoss))):
        out.append(
            (
                "kd_loss._component_",
                f"{node['_component_']} with teacher_cache: a cache serves tad_torchtune.TADLoss and "
                "tad_torchtune.ForwardKLLoss only",
            )
        )
        return manifest, out
    top_k = component_default(node, "top_k") if issubclass(kind, TADLoss) else None
    temperature = component_default(node, "temperature")
    try:
        check_compatible(
            manifest,
            where="",
            vocab_size=student_vocab,
            top_k=top_k if isinstance(top_k, int) else None,
            temperature=temperature if isinstance(temperature, int | float) else None,
        )
    except TeacherCacheError as err:
        out.append(("teacher_cache", str(err)))
    return manifest, out


def corpus_problems(manifest: dict[str, Any], parts: list[Any]) -> list[tuple[str, str]]:
    """Whether the run's datasets (concatenated in order) are the corpus the cache was written for.

    Args:
        manifest (dict[str, Any]): what :func:`cache_problems` read.
        parts (list[Any]): one built dataset per ``dataset`` entry.

    Returns:
        list[tuple[str, str]]: at most one ``("teacher_cache", message)``.
    """
    from torch.utils.data import ConcatDataset

    ds = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    try:
        check_compatible(manifest, where="", num_sequences=sum(len(p) for p in parts), corpus=corpus_fingerprint(ds))
    except TeacherCacheError as err:
        return [("teacher_cache", str(err))]
    return []
