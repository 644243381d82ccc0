"""Small helpers shared by the evaluation code: turning a torchtune model's output into logit chunks."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def as_chunks(out: torch.Tensor | list[torch.Tensor] | object) -> list[torch.Tensor]:
    """Normalise a model output to a list of ``[B, S_c, V]`` logit chunks along the sequence.

    Args:
        out: what ``model(tokens)`` returned: a ``[B, S, V]`` tensor, a list of ``[B, S_c, V]`` chunks
            (torchtune's ``set_num_output_chunks``) or an HF-style output with ``.logits``.

    Returns:
        list[torch.Tensor]: the chunks (one element for a plain tensor).
    """
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], (list, tuple)):
        out = out[-1]  # output_hidden_states with chunked logits: [h_i, ..., [chunks]]
    if isinstance(out, (list, tuple)) and out and all(isinstance(c, torch.Tensor) for c in out):
        return list(out)
    raise TypeError(f"expected model output to be a [B, S, V] tensor or a list of chunks, got {type(out).__name__}")


def paired_chunks(
    student_out: object, teacher_out: object, labels: torch.Tensor, max_rows: int = 1024
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield matching ``(student [N, V], teacher [N, V_T], labels [N])`` row blocks of at most ``max_rows`` rows.

    Student and teacher may be chunked differently (or not at all); both are split at the same sequence
    boundaries so that at most one ``[B, S_c, V]`` fp32 copy per model is alive at a time.
    """
    s_chunks, t_chunks = as_chunks(student_out), as_chunks(teacher_out)
    s_sizes, t_sizes = [c.size(1) for c in s_chunks], [c.size(1) for c in t_chunks]
    if s_sizes != t_sizes:
        # Different chunking: fall back to one tensor each (only reached with mismatched configs).
        s_chunks, t_chunks = [torch.cat(s_chunks, dim=1)], [torch.cat(t_chunks, dim=1)]
    label_chunks = labels.split([c.size(1) for c in s_chunks], dim=1)
    for s, t, y in zip(s_chunks, t_chunks, label_chunks, strict=True):
        s2, t2, y2 = s.reshape(-1, s.size(-1)), t.reshape(-1, t.size(-1)), y.reshape(-1)  # [B, S_c, V] -> [N, V]
        for start in range(0, y2.numel(), max_rows):
            yield s2[start : start + max_rows], t2[start : start + max_rows], y2[start : start + max_rows]


def single_chunks(
    out: object, labels: torch.Tensor, max_rows: int = 1024
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits [N, V], labels [N])`` row blocks of at most ``max_rows`` rows from one model output."""
    chunks = as_chunks(out)
    for c, y in zip(chunks, labels.split([c.size(1) for c in chunks], dim=1), strict=True):
        c2, y2 = c.reshape(-1, c.size(-1)), y.reshape(-1)
        for start in range(0, y2.numel(), max_rows):
            yield c2[start : start + max_rows], y2[start : start + max_rows]
