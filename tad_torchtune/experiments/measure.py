r"""Held-out measurements of a student against a frozen teacher, for the experiment suite.

The teacher never changes, so its log-probabilities on an evaluation set are computed once
(:meth:`TeacherReference.build`), stored as float16 on disk and memory-mapped by every run (and every
shard process) that evaluates against them. Per student evaluation (:func:`evaluate_student`), over the
positions of the set, all in float32:

- ``fkl``: forward KL :math:`\sum_v p_T \log(p_T / p_S)` (the paper's Figure 1 quantity), ``rkl``: reverse KL;
- ``ce`` and ``ppl``: cross-entropy / perplexity of the true next token; ``top1_agreement`` with the teacher;
- ``full_ece`` and ``ece_top1`` (:class:`tad_torchtune.eval.full_ece.FullECE`);
- the mechanism of the paper's Eq. 6: for each K, the teacher's tail mass
  :math:`\alpha_T = 1 - \sum_{i \in S_K} p_{T,i}` and the student's mass on the same tail
  :math:`\alpha_S = 1 - \sum_{i \in S_K} p_{S,i}` (``alpha_t_K``, ``alpha_s_K``, means over positions), where
  :math:`S_K` is the teacher's top-K set.

The float16 storage rounds a log-probability by at most 2^-11 of its size (about 5e-4 nats at log p = -1),
the same rounding for every run, so differences between runs are unaffected; the teacher's own figures
(:meth:`TeacherReference.teacher_stats`) are computed in float32 before storing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tad_torchtune.eval.full_ece import FullECE
from tad_torchtune.eval.logit_chunks import as_chunks

__all__ = ["EvalSet", "TeacherReference", "evaluate_student", "TAIL_KS"]

TAIL_KS: tuple[int, ...] = (1, 5, 10, 20)  # K of the alpha_S / alpha_T mechanism figures
_FIGURE2_KS = tuple(range(1, 51))  # the teacher's alpha_K curve (paper Figure 2)


class EvalSet:
    """Token windows to evaluate on: ``tokens`` and shifted ``labels``, both ``[N, S]`` (no ignored labels).

    Args:
        name (str): the set's name (a file name: letters, digits, ``_``, ``-``).
        tokens (torch.Tensor): ``[N, S]`` input ids.
        labels (torch.Tensor): ``[N, S]`` next-token ids (``labels[:, t]`` is the target of position ``t``).
    """

    def __init__(self, name: str, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        if tokens.shape != labels.shape or tokens.dim() != 2:
            raise ValueError(f"eval set {name!r}: tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)}")
        self.name, self.tokens, self.labels = name, tokens.long(), labels.long()

    @classmethod
    def from_windows(cls, name: str, windows: torch.Tensor) -> EvalSet:
        """From ``[N, S + 1]`` windows (:func:`tad_torchtune.demo.text.pack`)."""
        return cls(name, windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def digest(self) -> str:
        """SHA-256 of the tokens and labels: a stored reference is only reused for the same text."""
        h = hashlib.sha256()
        for t in (self.tokens, self.labels):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().astype(np.int64).tobytes())
        return h.hexdigest()


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` float32 logits of a torchtune decoder (chunked outputs are joined)."""
    device = next(model.parameters()).device
    return torch.cat([c.float() for c in as_chunks(model(tokens.to(device)))], dim=1)


class TeacherReference:
    """The teacher's float16 log-probabilities on one :class:`EvalSet`, stored in ``root`` and memory-mapped.

    Args:
        root (Path): folder holding ``<name>.logp.npy`` ``[N*S, V]`` and ``<name>.json``.
        eval_set (EvalSet): the set the reference was built on.
    """

    def __init__(self, root: Path, eval_set: EvalSet) -> None:
        self.eval_set = eval_set
        meta_path = Path(root) / f"{eval_set.name}.json"
        meta = json.loads(meta_path.read_text())
        if meta["digest"] != eval_set.digest():
            raise ValueError(
                f"{meta_path} was built on other text than eval set {eval_set.name!r}; delete {Path(root)} "
                "to rebuild the teacher reference"
            )
        self.meta = meta
        self.logp = np.load(Path(root) / f"{eval_set.name}.logp.npy", mmap_mode="r")  # [N*S, V] float16

    @staticmethod
    def exists(root: Path, eval_set: EvalSet) -> bool:
        return (Path(root) / f"{eval_set.name}.json").is_file()

    @classmethod
    @torch.no_grad()
    def build(
        cls, root: Path, eval_set: EvalSet, teacher: torch.nn.Module, vocab_size: int, batch_size: int = 4
    ) -> TeacherReference:
        """Runs the teacher once over ``eval_set`` and stores its log-probabilities over the student's vocabulary.

        A teacher vocabulary larger than ``vocab_size`` (padded rows) is cut and renormalised, as
        :func:`tad_torchtune.eval.diagnostics.heldout_metrics` does. The ``.json`` is written last, so a
        folder without it holds no usable reference.
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        n, s = eval_set.tokens.shape
        tmp = root / f"{eval_set.name}.logp.npy.tmp"
        logp = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n * s, vocab_size))
        ks = torch.tensor(_FIGURE2_KS)
        nll = wrong = 0.0
        alpha_sum = torch.zeros(len(_FIGURE2_KS), dtype=torch.float64)
        was_training = teacher.training
        teacher.eval()
        try:
            for i in range(0, n, batch_size):
                lp = F.log_softmax(_logits(teacher, eval_set.tokens[i : i + batch_size])[..., :vocab_size], -1).cpu()
                lp = lp.reshape(-1, vocab_size)  # [b*S, V]
                y = eval_set.labels[i : i + batch_size].reshape(-1)
                nll -= float(lp.gather(-1, y[:, None]).sum())
                wrong += float((lp.argmax(-1) != y).sum())
                top = lp.topk(int(ks.max()), dim=-1).values.exp().cumsum(-1)  # [b*S, 50]
                alpha_sum += (1 - top[:, ks - 1]).double().sum(0)
                logp[i * s : i * s + lp.size(0)] = lp.numpy().astype(np.float16)
        finally:
            teacher.train(was_training)
        logp.flush()
        del logp
        tmp.replace(root / f"{eval_set.name}.logp.npy")
        count = n * s
        meta = {
            "name": eval_set.name,
            "digest": eval_set.digest(),
            "num_tokens": count,
            "vocab_size": vocab_size,
            "teacher_ce": nll / count,
            "teacher_ppl": math.exp(nll / count),
            "teacher_argmax_error": wrong / count,
            "alpha_k": {str(k): float(a) / count for k, a in zip(_FIGURE2_KS, alpha_sum.tolist(), strict=True)},
        }
        (root / f"{eval_set.name}.json").write_text(json.dumps(meta, indent=1))
        return cls(root, eval_set)

    def teacher_stats(self) -> dict[str, object]:
        """The teacher's CE, perplexity, arg-max error rate and tail mass alpha_K for K = 1..50 (Figure 2)."""
        return {k: self.meta[k] for k in ("teacher_ce", "teacher_ppl", "teacher_argmax_error", "alpha_k")}


class _Sums:
    """Running sums of :func:`evaluate_student`'s measurements over the positions seen so far."""

    def __init__(self, ks: Sequence[int], n_bins: int) -> None:
        self.ks = tuple(ks)
        self.cols = torch.tensor(self.ks) - 1
        self.fkl = self.rkl = self.nll = self.agree = 0.0
        self.count = 0
        self.alpha_t = torch.zeros(len(self.ks), dtype=torch.float64)
        self.alpha_s = torch.zeros(len(self.ks), dtype=torch.float64)
        self.ece = FullECE(n_bins=n_bins)

    def add(self, lp_s: torch.Tensor, lp_t: torch.Tensor, y: torch.Tensor) -> None:
        """Positions ``[N, V]`` of student and teacher log-probabilities, labels ``[N]``."""
        p_s, p_t = lp_s.exp(), lp_t.exp()
        diff = lp_t - lp_s
        self.fkl += float((p_t * diff).sum())
        self.rkl -= float((p_s * diff).sum())
        self.nll -= float(lp_s.gather(-1, y[:, None]).sum())
        self.ece.update_probs(p_s, y)
        top = lp_t.topk(int(self.cols.max()) + 1, dim=-1).indices  # the teacher's top-K sets, nested in K
        self.agree += float((lp_s.argmax(-1) == top[:, 0]).sum())
        cols = self.cols.to(top.device)
        self.alpha_t += (1 - p_t.gather(-1, top).cumsum(-1)[:, cols]).double().sum(0).cpu()
        self.alpha_s += (1 - p_s.gather(-1, top).cumsum(-1)[:, cols]).double().sum(0).cpu()
        self.count += y.numel()

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        out = {
            "fkl": self.fkl / n,
            "rkl": self.rkl / n,
            "ce": self.nll / n,
            "ppl": math.exp(self.nll / n),
            "top1_agreement": self.agree / n,
            "num_tokens": float(self.count),
        }
        cal = self.ece.compute()
        out["full_ece"], out["ece_top1"] = float(cal["full_ece"]), float(cal["ece_top1"])
        for k, a_t, a_s in zip(self.ks, (self.alpha_t / n).tolist(), (self.alpha_s / n).tolist(), strict=True):
            out[f"alpha_t_{k}"], out[f"alpha_s_{k}"] = a_t, a_s
        return out


@torch.no_grad()
def evaluate_student(
    student: torch.nn.Module,
    reference: TeacherReference,
    prefixes: Sequence[int] | None = None,
    *,
    batch_size: int = 4,
    ks: Sequence[int] = TAIL_KS,
    n_bins: int = 10,
) -> dict[int, dict[str, float]]:
    """Every measurement of the module docstring, on the first ``n`` windows of the set for each ``n`` in ``prefixes``.

    One pass over the longest prefix gives all of them (the curve subset and the whole set cost one forward).

    Args:
        student (torch.nn.Module): a torchtune decoder whose vocabulary is the reference's.
        reference (TeacherReference): the teacher's stored log-probabilities on the set.
        prefixes (Sequence[int] | None): window counts to report; each is capped at the set's size.
            Default: None (the whole set)
        batch_size (int): windows per forward. Default: 4
        ks (Sequence[int]): the K of ``alpha_t_K`` / ``alpha_s_K``. Default: (1, 5, 10, 20)
        n_bins (int): Full-ECE bins. Default: 10

    Returns:
        dict[int, dict[str, float]]: per prefix, ``fkl``, ``rkl``, ``ce``, ``ppl``, ``top1_agreement``,
        ``full_ece``, ``ece_top1``, ``alpha_t_K`` and ``alpha_s_K`` for each K, ``num_tokens``.
    """
    eval_set = reference.eval_set
    total, s = eval_set.tokens.shape
    stops = sorted({min(int(n), total) for n in (prefixes or [total])})
    vocab = reference.meta["vocab_size"]
    sums, out = _Sums(ks, n_bins), {}
    was_training = student.training
    student.eval()
    try:
        i = 0
        for stop in stops:
            while i < stop:
                b = min(batch_size, stop - i)
                logits = _logits(student, eval_set.tokens[i : i + b])
                if logits.size(-1) != vocab:
                    raise ValueError(f"student vocabulary {logits.size(-1)} != the reference's {vocab}")
                lp_s = F.log_softmax(logits.reshape(-1, vocab), -1)  # [b*S, V]
                # The metrics run where the student is (the GPU profile); the fp16 reference is copied there.
                lp_t = torch.from_numpy(np.array(reference.logp[i * s : (i + b) * s])).to(lp_s.device).float()
                sums.add(lp_s, lp_t, eval_set.labels[i : i + b].reshape(-1).to(lp_s.device))
                i += b
            out[stop] = sums.result()
    finally:
        student.train(was_training)
    return {n: out[min(int(n), total)] for n in (prefixes or [total])}
