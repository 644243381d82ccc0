"""Start-up checks of the recipe's tokenizers and data (``tad-tune validate``).

- :func:`tokenizer_problems`: the tokenizer files exist, the tokenizer builds and its ids fit the student, and
  ``teacher_tokenizer`` (when given) agrees with ``tokenizer`` on every shared id (:func:`check_vocab_alignment`).
- :func:`build_datasets` / :func:`dataset_size_problems`: the dataset builds with that tokenizer and holds at
  least one optimizer step's worth of samples.

Each returns ``(key, message)`` pairs (and what it built, which the recipe's setup reuses);
:mod:`tad_torchtune.validate` runs them in order with the other checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tad_torchtune.check_tools import one_line
from tad_torchtune.data.vocab import check_vocab_alignment

__all__ = ["TOKENIZER_FILE_ARGS", "build_datasets", "dataset_size_problems", "tokenizer_problems"]

# Tokenizer builder arguments that name a file (torchtune's tokenizers): checked to exist before building.
TOKENIZER_FILE_ARGS = (
    "path",
    "merges_file",
    "special_tokens_path",
    "tokenizer_json_path",
    "tokenizer_config_json_path",
)


def tokenizer_problems(cfg: DictConfig, *, student_vocab: int | None) -> tuple[Any, list[tuple[str, str]]]:
    """Builds ``tokenizer`` and checks it against the student and ``teacher_tokenizer``.

    A file the tokenizers name that does not exist (the model is not downloaded yet) is one line per file, for
    both sides; then the tokenizer builds, its ids fit the student's embedding, and ``teacher_tokenizer`` (when
    given) maps every shared id to the same token.

    Args:
        cfg (DictConfig): the recipe config (``tokenizer``, ``teacher_tokenizer``).
        student_vocab (int | None): ids the student embeds (None: unknown, not compared).

    Returns:
        tuple[Any, list[tuple[str, str]]]: the built tokenizer (None when it did not build) and (key, message)
        per problem.
    """
    from torchtune import config

    out: list[tuple[str, str]] = []
    missing = {}
    for key in ("tokenizer", "teacher_tokenizer"):
        found = _missing_file_problems(cfg, key)
        out += found
        missing[key] = bool(found)
    if missing["tokenizer"]:
        return None, out
    try:
        tokenizer = config.instantiate(cfg.tokenizer)
    except Exception as err:
        return None, [*out, ("tokenizer", f"cannot build the tokenizer ({one_line(err)})")]
    v_tok = getattr(tokenizer, "vocab_size", None)
    if isinstance(v_tok, int) and student_vocab is not None and v_tok > student_vocab:
        out.append(
            (
                "tokenizer",
                f"the tokenizer has {v_tok} ids but the student embeds only {student_vocab} (model.vocab_size); "
                "ids >= that would index out of range",
            )
        )
    if cfg.get("teacher_tokenizer") is None or missing["teacher_tokenizer"]:
        return tokenizer, out
    try:
        teacher_tok = config.instantiate(cfg.teacher_tokenizer)
    except Exception as err:
        return tokenizer, [*out, ("teacher_tokenizer", f"cannot build the tokenizer ({one_line(err)})")]
    report = check_vocab_alignment(
        teacher_tok, tokenizer, raise_on_mismatch=False, teacher_name="teacher_tokenizer", student_name="tokenizer"
    )
    ok = getattr(report, "ok", None)
    if ok is False or (ok is None and getattr(report, "num_mismatched", 0)):
        summary = report.summary() if hasattr(report, "summary") else str(report)
        out.append(("teacher_tokenizer", f"vocabulary mismatch between teacher and student: {summary.splitlines()[0]}"))
    return tokenizer, out


def _missing_file_problems(cfg: DictConfig, key: str) -> list[tuple[str, str]]:
    """One problem per file argument of tokenizer node ``key`` that does not exist."""
    node = cfg.get(key)
    if node is None:
        return []
    out = []
    for arg in TOKENIZER_FILE_ARGS:
        value = node.get(arg)
        if isinstance(value, str) and not Path(value).exists():
            side = "student" if key == "tokenizer" else "teacher"
            out.append(
                (
                    f"{key}.{arg}",
                    f"{value} does not exist: download the {side} model first (`tune download <repo> --output-dir "
                    f"<dir>`, the command is in the config's header) or point {key}.{arg} at its tokenizer file; "
                    "until then the teacher/student vocabulary check cannot run",
                )
            )
    return out


def build_datasets(cfg: DictConfig, tokenizer: Any) -> tuple[list[Any] | None, list[tuple[str, str]]]:
    """Builds each ``dataset`` entry (a node or a list of nodes) with ``tokenizer``, as the recipe will.

    Args:
        cfg (DictConfig): the recipe config (``dataset``).
        tokenizer (Any): the built tokenizer.

    Returns:
        tuple[list[Any] | None, list[tuple[str, str]]]: one dataset per entry (None when one did not build) and
        at most one ``("dataset", message)``.
    """
    from torchtune import config

    ds_cfg = cfg.dataset
    try:
        parts = [config.instantiate(c, tokenizer) for c in (ds_cfg if isinstance(ds_cfg, ListConfig) else [ds_cfg])]
        sum(len(p) for p in parts)  # a dataset whose length fails does not build either
    except StopIteration:  # HF datasets' json/csv builders on a source without records
        files = OmegaConf.select(cfg, "dataset.data_files", default=None)
        return None, [("dataset", f"cannot build the dataset: its source {files or ''} holds no records (empty file?)")]
    except Exception as err:
        return None, [("dataset", f"cannot build the dataset ({one_line(err)})")]
    return parts, []


def dataset_size_problems(cfg: DictConfig, parts: list[Any], world_size: int) -> list[tuple[str, str]]:
    """The datasets hold at least one optimizer step: ``batch_size x gradient_accumulation_steps x world_size``.

    Args:
        cfg (DictConfig): the recipe config (``batch_size``, ``gradient_accumulation_steps``).
        parts (list[Any]): what :func:`build_datasets` built.
        world_size (int): processes the run will use.

    Returns:
        list[tuple[str, str]]: at most one ``("dataset", message)``.
    """
    n = sum(len(p) for p in parts)
    bs, accum = cfg.get("batch_size"), cfg.get("gradient_accumulation_steps")
    if n == 0:
        return [("dataset", "is empty (0 samples)")]
    if isinstance(bs, int) and isinstance(accum, int) and bs >= 1 and accum >= 1:
        need = bs * accum * world_size
        if n < need:
            return [
                (
                    "dataset",
                    f"has {n} samples but one optimizer step needs {need} (batch_size={bs} x "
                    f"gradient_accumulation_steps={accum} x {world_size} process(es)); add data or shrink the batch",
                )
            ]
    return []
