"""Teacher/student vocabulary alignment: token-level distillation needs id ``i`` to mean the same string in both.

TAD (like every logit-matching KD loss) compares the teacher's and the student's distributions id by id over
the student's vocabulary; the loss cuts the teacher's logits to the student's size, so the teacher may have
extra ids at the end (Phi-3's chat specials 32000-32063 over Llama-2's 32000), but every shared id must map to
the same token. The recipe calls :func:`check_vocab_alignment` at start-up.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from tad_torchtune.data import tokenizer_tools as tk

log = logging.getLogger(__name__)


class VocabMismatchError(ValueError):
    """The teacher and student tokenizers disagree on shared ids (or the student has ids the teacher lacks)."""


@dataclass
class VocabAlignmentReport:
    """What :func:`check_vocab_alignment` found.

    Attributes:
        teacher (str), student (str): tokenizer names.
        teacher_vocab_size (int), student_vocab_size (int): ids each can emit (special tokens included).
        num_compared (int): shared ids compared.
        mismatches (list[tuple[int, str, str]]): (id, teacher string, student string) that differ.
        teacher_extra_ids (range): ids only the teacher has (their logits are cut by the loss).
        teacher_extra_tokens (dict[int, str]): strings of the first extra ids (up to 16).
    """

    teacher: str
    student: str
    teacher_vocab_size: int
    student_vocab_size: int
    num_compared: int
    mismatches: list[tuple[int, str, str]] = field(default_factory=list)
    teacher_extra_ids: range = range(0)
    teacher_extra_tokens: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.student_vocab_size <= self.teacher_vocab_size

    def summary(self) -> str:
        extra = len(self.teacher_extra_ids)
        lines = [
            f"vocabulary check: teacher {self.teacher} ({self.teacher_vocab_size} ids) vs student {self.student} "
            f"({self.student_vocab_size} ids): {self.num_compared} shared ids compared, "
            f"{len(self.mismatches)} mismatches, {extra} teacher-only ids"
            + (f" {self.teacher_extra_ids.start}-{self.teacher_extra_ids.stop - 1}" if extra else "")
        ]
        if self.teacher_extra_tokens:
            shown = ", ".join(f"{i}={s!r}" for i, s in list(self.teacher_extra_tokens.items())[:8])
            lines.append(f"  teacher-only ids (logits cut by the loss): {shown}{' ...' if extra > 8 else ''}")
        for i, t, s in self.mismatches[:5]:
            lines.append(f"  id {i}: teacher {t!r} != student {s!r}")
        return "\n".join(lines)


def check_vocab_alignment(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    *,
    num_samples: int | None = 100_000,
    seed: int = 0,
    max_mismatch_fraction: float = 0.0,
    allow_student_extra_ids: bool = False,
    teacher_name: str | None = None,
    student_name: str | None = None,
    raise_on_mismatch: bool = True,
) -> VocabAlignmentReport:
    """Compare id -> token string on the ids both tokenizers share; report the teacher's extra ids.

    Every shared id is compared when there are at most ``num_samples`` of them (about 0.1 s per 30k ids),
    else a seeded random sample of ``num_samples`` ids that always includes the special ids and the first
    and last ``min(256, num_samples // 4)``.
    Special tokens are compared by name (``<|endoftext|>``), other ids by their vocabulary piece.

    Args:
        teacher_tokenizer: teacher's tokenizer (torchtune ``ModelTokenizer`` or HF).
        student_tokenizer: student's tokenizer.
        num_samples (int | None): most shared ids to compare; None compares all. Default: 100000.
        seed (int): sampling seed. Default: 0.
        max_mismatch_fraction (float): tolerated fraction of differing ids (0 = exact). Default: 0.0.
        allow_student_extra_ids (bool): accept a student vocabulary larger than the teacher's (those ids would
            get no teacher logits). Default: False.
        teacher_name (str | None), student_name (str | None): names for messages (e.g. the config paths).
            Default: the tokenizer classes and files.
        raise_on_mismatch (bool): raise :class:`VocabMismatchError` on failure instead of only reporting.
            Default: True.

    Returns:
        VocabAlignmentReport: also logged at INFO (``report.summary()``).

    Raises:
        VocabMismatchError: (when ``raise_on_mismatch``) shared ids differ beyond ``max_mismatch_fraction``, or the
            student has more ids than the teacher and ``allow_student_extra_ids`` is False.

    Example:
        >>> report = check_vocab_alignment(teacher_tok, student_tok, teacher_name="phi3_mini", student_name="tinyllama")
        >>> report.teacher_extra_ids
        range(32000, 32064)
    """
    t_name = teacher_name or tk.describe(teacher_tokenizer)
    s_name = student_name or tk.describe(student_tokenizer)
    v_t, v_s = tk.vocab_size(teacher_tokenizer), tk.vocab_size(student_tokenizer)
    shared = min(v_t, v_s)
    if num_samples is None or shared <= num_samples:
        ids = list(range(shared))
    else:
        edge = min(256, num_samples // 4)  # the first ids (bytes/specials) and the last ones (added tokens)
        must = set(range(min(edge, shared))) | set(range(max(0, shared - edge), shared))
        for tok in (teacher_tokenizer, student_tokenizer):
            must |= {i for i in tk.special_tokens(tok).values() if i < shared}
        rest = [i for i in random.Random(seed).sample(range(shared), min(num_samples, shared)) if i not in must]
        ids = sorted(must | set(rest[: max(0, num_samples - len(must))]))
    mismatches = []
    for i in ids:
        a, b = tk.token_string(teacher_tokenizer, i), tk.token_string(student_tokenizer, i)
        if a != b:
            mismatches.append((i, a, b))
    extra = range(v_s, v_t) if v_t > v_s else range(0)
    report = VocabAlignmentReport(
        teacher=t_name,
        student=s_name,
        teacher_vocab_size=v_t,
        student_vocab_size=v_s,
        num_compared=len(ids),
        mismatches=mismatches,
        teacher_extra_ids=extra,
        teacher_extra_tokens={i: tk.token_string(teacher_tokenizer, i) for i in list(extra)[:16]},
    )
    log.info(report.summary())
    if not raise_on_mismatch:
        return report
    if len(mismatches) > max_mismatch_fraction * max(1, len(ids)):
        raise VocabMismatchError(
            f"teacher tokenizer {t_name} and student tokenizer {s_name} disagree on {len(mismatches)} of "
            f"{len(ids)} shared ids (e.g. "
            + "; ".join(f"id {i}: teacher {a!r} vs student {b!r}" for i, a, b in mismatches[:3])
            + "). Token-level distillation needs the same vocabulary: pick a teacher/student pair from the same "
            "tokenizer family, or raise max_mismatch_fraction if the differences are known to be harmless."
        )
    if v_s > v_t and not allow_student_extra_ids:
        raise VocabMismatchError(
            f"student tokenizer {s_name} has {v_s} ids but teacher tokenizer {t_name} has {v_t}: ids "
            f"{v_t}-{v_s - 1} would get no teacher logits. Use allow_student_extra_ids=True if they never occur "
            "in the data (e.g. unused special tokens)."
        )
    return report
