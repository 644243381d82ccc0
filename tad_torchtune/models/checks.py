"""Start-up checks of the recipe's models (``tad-tune validate``): they build, and their sizes fit each other.

Models are built on the meta device: no memory, no weights, so a 14B teacher is checked in a second. The
checks return ``(key, message)`` pairs; :mod:`tad_torchtune.validate` runs them in order with the others.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from tad_torchtune.check_tools import component_default, model_vocab, one_line

__all__ = ["MODEL_KEYS", "build_on_meta", "model_vocab", "size_problems"]

MODEL_KEYS = ("model", "teacher_model")


def build_on_meta(
    cfg: DictConfig, reported: Collection[str] = ()
) -> tuple[dict[str, nn.Module], list[tuple[str, str]]]:
    """Builds ``model`` and ``teacher_model`` on the meta device.

    Args:
        cfg (DictConfig): the recipe config.
        reported (Collection[str]): keys already reported; a model with a reported argument (``model.x``) is
            not built. Default: ()

    Returns:
        tuple[dict[str, nn.Module], list[tuple[str, str]]]: the models that built, by key, and one
        ``(key, "cannot build the model (...)")`` per model that did not.
    """
    import torch
    from torchtune import config

    models: dict[str, nn.Module] = {}
    out: list[tuple[str, str]] = []
    for key in MODEL_KEYS:
        node = cfg.get(key)
        if node is None or not isinstance(node, DictConfig) or any(k.startswith(f"{key}.") for k in reported):
            continue
        try:
            with torch.device("meta"):
                models[key] = config.instantiate(node)
        except Exception as err:
            out.append((key, f"cannot build the model ({one_line(err)})"))
    return models, out


def size_problems(cfg: DictConfig, models: Mapping[str, nn.Module], *, uses_teacher: bool) -> list[tuple[str, str]]:
    """The built models against each other and the config: the teacher's vocabulary covers the student's,
    ``kd_loss.top_k`` < the student's vocabulary, ``tokenizer.max_seq_len`` <= what the models support.

    Args:
        cfg (DictConfig): the recipe config.
        models (Mapping[str, nn.Module]): what :func:`build_on_meta` built.
        uses_teacher (bool): whether the run loads the teacher (else the teacher's sizes do not matter).

    Returns:
        list[tuple[str, str]]: (key, message) per problem, e.g. ``("kd_loss.top_k", "top_k=300 must be ...")``.
    """
    student, teacher = models.get("model"), models.get("teacher_model")
    v_s, v_t = model_vocab(student), model_vocab(teacher)
    out: list[tuple[str, str]] = []
    if uses_teacher and v_s is not None and v_t is not None and v_t < v_s:
        out.append(
            (
                "teacher_model.vocab_size",
                f"teacher vocabulary {v_t} < student vocabulary {v_s}: student ids >= {v_t} would get no teacher "
                "logits; use a teacher of the same tokenizer family or a student with <= the teacher's vocabulary",
            )
        )
    top_k = component_default(cfg.get("kd_loss"), "top_k")
    if isinstance(top_k, int) and v_s is not None and top_k >= v_s:
        out.append(("kd_loss.top_k", f"top_k={top_k} must be smaller than the student vocabulary ({v_s})"))
    seq = OmegaConf.select(cfg, "tokenizer.max_seq_len", default=None)
    if isinstance(seq, int):
        limits = [
            (getattr(m, "max_seq_len", None), k)
            for k, m in (("model", student), ("teacher_model", teacher if uses_teacher else None))
        ]
        limits = [(n, k) for n, k in limits if isinstance(n, int)]
        if limits and seq > min(limits)[0]:
            limit, key = min(limits)
            out.append(
                (
                    "tokenizer.max_seq_len",
                    f"{seq} is larger than {key} supports ({key}.max_seq_len={limit}); lower it to <= {limit}",
                )
            )
    return out
