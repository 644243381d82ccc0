"""MiniPLM's difference sampling (Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training Language Models",
arXiv 2410.17215, Section 2.2; code: github.com/thu-coai/MiniPLM).

MiniPLM distils offline by reshaping the corpus: every pre-training instance ``x`` is scored with the large
teacher and a small reference model (trained on a slice of the same corpus) and only the instances where the
teacher is most ahead of the reference are kept. In their code (``pretrain/inferer.py`` writes each model's
per-instance language-modelling loss; ``scripts/miniplm/difference_sampling/compute_difference_scores.py``
takes ``small_loss - large_loss``; ``construct_pretrain_data.py`` sorts descending and keeps the first
``int(ratio * N)`` instances, written back in corpus order) the score is

    score(x) = mean_t [log p_teacher(x_t | x_<t) - log p_ref(x_t | x_<t)]

over the instance's predicted tokens (their instances are fixed 1,025-token chunks, so the mean and the sum rank
alike; ours are the recipe's windows, all ``max_seq_len`` targets long). The paper keeps the top half
(``α = 0.5``; its Table 1 compares TAD with MiniPLM at that setting).

Cost: one forward of the teacher and one of the reference over the corpus (no backward), and
``16`` bytes per instance of scores on disk; the selected corpus is a new token file of half the size.

Here: :class:`DifferenceScoreWriter` is the pass's writer (scores ``teacher_logprob``, ``ref_logprob`` (sums,
float64) and ``score`` (the mean difference) per window); :func:`select_top_fraction` picks the instances and
:func:`write_selected_token_file` writes the selected windows as a token file that ``packed_token_dataset``
reads unchanged (``max_seq_len`` must be the scoring one).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from tad_torchtune.offline.engine import Batch, load_pass, read_manifest
from tad_torchtune.offline.models import LoadedModel, token_logprobs

# The fraction of instances MiniPLM keeps (its difference-sampling ratio α; paper Section 2.2 and Table 1).
PAPER_FRACTION = 0.5


class DifferenceScoreWriter:
    """Per window: ``log p_teacher``, ``log p_ref`` (sums over the ``L`` targets) and their mean difference.

    Args:
        teacher (LoadedModel): the large model.
        reference (LoadedModel): the small reference model (same tokenizer).
    """

    kind = "miniplm_score"

    def __init__(self, teacher: LoadedModel, reference: LoadedModel):
        self.teacher, self.reference = teacher, reference

    def identity(self) -> dict[str, Any]:
        return {"teacher": self.teacher.identity(), "reference": self.reference.identity(), "score": "mean_diff"}

    def records(self, batch: Batch) -> dict[str, np.ndarray]:
        """Scores of a batch of windows (``tokens`` ``[B, L + 1]``, all of one length)."""
        if int(batch.lengths.min()) != batch.tokens.shape[1]:
            raise ValueError("difference scoring needs windows of one length (a WindowSource)")
        inputs, labels = batch.tokens[:, :-1], batch.tokens[:, 1:]
        lp_t = token_logprobs(self.teacher.model, inputs, labels).double().sum(-1)
        lp_r = token_logprobs(self.reference.model, inputs, labels).double().sum(-1)
        score = (lp_t - lp_r) / labels.shape[1]
        return {
            "teacher_logprob": lp_t.cpu().numpy(),
            "ref_logprob": lp_r.cpu().numpy(),
            "score": score.cpu().numpy(),
            "_tokens": np.full(len(batch.indices), labels.shape[1]),  # scored tokens (each through both models)
        }


def select_top_fraction(scores: np.ndarray, fraction: float = PAPER_FRACTION) -> np.ndarray:
    """Indices of the ``int(fraction * N)`` highest scores, in ascending (corpus) order.

    Ties are broken by the lower index (a stable sort), so the selection is deterministic.

    Args:
        scores (np.ndarray): ``[N]`` difference scores.
        fraction (float): in (0, 1]. Default: 0.5 (the paper's).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    scores = np.asarray(scores)
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"score of instance {bad} is {scores[bad]}: the scoring pass produced a non-finite value")
    k = int(fraction * len(scores))
    if k == 0:
        raise ValueError(f"fraction={fraction} of {len(scores)} instances keeps none; raise it or score more text")
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:k])


def write_selected_token_file(
    scores_dir: str | Path, output: str | Path, fraction: float = PAPER_FRACTION, overwrite: bool = False
) -> dict[str, Any]:
    """Write the windows MiniPLM keeps as a new token file (``.bin`` + ``.json``), read unchanged by the recipe.

    Window ``i`` of the scored file is ``tokens[i L : i L + L + 1]``. The new file holds, for each kept window
    in corpus order, its first ``L`` tokens, then the very last token of the last kept window; with the same
    ``max_seq_len`` the recipe's window ``j`` of the new file is then exactly the ``j``-th kept window, except
    that its last label is the next kept window's first token (as at any boundary between packed documents).

    Args:
        scores_dir (str | Path): a complete ``miniplm_score`` pass.
        output (str | Path): the new token file (``.bin``).
        fraction (float): kept fraction. Default: 0.5 (the paper's).
        overwrite (bool): replace an existing ``output``. Default: False.

    Returns:
        The new file's metadata.
    """
    from tad_torchtune.data.token_file import FORMAT, VERSION, meta_path, open_token_file

    manifest = read_manifest(scores_dir)
    ident = manifest["identity"]
    if ident["writer"] != DifferenceScoreWriter.kind:
        raise ValueError(f"{scores_dir} holds a {ident['writer']!r} pass, not MiniPLM scores (tad-tune offline score)")
    src = ident["source"]
    scored = manifest.get("source_path")
    if src.get("kind") != "token_file_windows" or not scored:
        raise ValueError(f"{scores_dir} was not scored from a token file's windows; nothing to select from")
    output = Path(output)
    if output.suffix != ".bin":
        raise ValueError(f"output {output} must end in .bin (the metadata goes next to it as .json)")
    if Path(scored).resolve() == output.resolve():
        raise ValueError(f"output {output} is the scored corpus itself; choose another file")
    if (output.exists() or meta_path(output).exists()) and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite (overwrite=True) or choose another --output")
    tokens, meta = open_token_file(scored)
    from tad_torchtune.offline.engine import file_sha256

    if file_sha256(scored) != src["sha256"]:
        raise ValueError(f"{scored} changed since it was scored in {scores_dir}; score it again")
    scores = load_pass(scores_dir, keys=["score"])
    kept = select_top_fraction(scores["score"][np.argsort(scores["index"])], fraction)
    L = int(src["max_seq_len"])
    dtype = np.dtype(meta["dtype"])
    out = np.empty(len(kept) * L + 1, dtype=dtype)
    for j, i in enumerate(kept):
        out[j * L : (j + 1) * L] = tokens[i * L : (i + 1) * L]
    out[-1] = tokens[kept[-1] * L + L]
    meta_path(output).unlink(missing_ok=True)  # metadata first: a .bin without its .json never looks complete
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with open(partial, "wb") as f:
        f.write(out.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, output)
    new_meta = {
        "format": FORMAT,
        "version": VERSION,
        "completed": True,
        "dtype": dtype.name,
        "num_tokens": int(out.size),
        "num_documents": int(np.count_nonzero(out == meta["eos_id"])),
        "vocab_size": meta["vocab_size"],
        "max_id": int(out.max()),
        "bos_id": meta["bos_id"],
        "eos_id": meta["eos_id"],
        "tokenizer": meta["tokenizer"],
        "source": {
            "kind": "miniplm_selection",
            "scored_file": scored,
            "scored_sha256": src["sha256"],
            "scores_dir": str(Path(scores_dir).resolve()),
            "scores_identity": manifest["identity_hash"],
            "fraction": fraction,
            "max_seq_len": L,
            "num_windows_scored": int(len(scores["score"])),
            "num_windows_kept": int(len(kept)),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = meta_path(output).with_name(meta_path(output).name + ".tmp")
    tmp.write_text(json.dumps(new_meta, indent=1))
    os.replace(tmp, meta_path(output))
    return new_meta
