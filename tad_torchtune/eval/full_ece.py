r"""Full-ECE (Liu et al. 2024, arXiv 2406.11345): calibration over the whole predictive distribution.

Every (position i, vocabulary entry k) pair is binned by its probability :math:`p_i^{(k)}` into M equal-width
bins (index :math:`\min(\lfloor p M \rfloor, M-1)`). With N scored positions,

.. math::
    \text{Full-ECE} = \sum_{m=1}^{M} \frac{|B^*_m|}{N} \, |A^*_m - C^*_m|
                    = \frac{1}{N} \sum_m \Bigl| \underbrace{\#\{i : p_i^{(y_i)} \in m\}}_{A_m}
                      - \underbrace{\textstyle\sum_{(i,k):\, p_i^{(k)} \in m} p_i^{(k)}}_{C_m} \Bigr|

because the :math:`|B^*_m|` factors cancel. So two length-M accumulators stream over any amount of text.
:math:`\sum_m A_m = \sum_m C_m = N` and the value lies in [0, 2]; lower is better. The classic top-1 ECE
comes from the same pass for comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from tad_torchtune.eval.logit_chunks import single_chunks

__all__ = ["FullECE", "full_ece_of_model"]


class FullECE:
    """Streaming Full-ECE and top-1 ECE accumulator.

    Args:
        n_bins (int): number of equal-width probability bins M. Default: 10
        ignore_index (int): label value that is not scored. Default: -100

    Example:
        >>> metric = FullECE(n_bins=10)
        >>> metric.update(logits, labels)  # [B, S, V], [B, S]; repeat over the evaluation set
        >>> metric.compute()["full_ece"]
    """

    def __init__(self, n_bins: int = 10, ignore_index: int = -100) -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Clear all accumulators."""
        m = self.n_bins
        self.hits = torch.zeros(m, dtype=torch.float64)  # A_m: positions whose true-token probability is in bin m
        self.mass = torch.zeros(m, dtype=torch.float64)  # C_m: probability mass of all entries in bin m
        self.top_count = torch.zeros(m, dtype=torch.float64)
        self.top_correct = torch.zeros(m, dtype=torch.float64)
        self.top_conf = torch.zeros(m, dtype=torch.float64)
        self.num_tokens = 0

    def _bin(self, p: torch.Tensor) -> torch.Tensor:
        return (p * self.n_bins).floor().clamp_(0, self.n_bins - 1).long()

    @torch.no_grad()
    def update_probs(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate already-normalised probabilities ``[N, V]`` for labels ``[N]`` (no ignored entries)."""
        m = self.n_bins
        dev = probs.device
        # Only entries with p * M >= 1 leave bin 0 and a row has at most M of them, so bin those sparsely (never
        # the whole [N, V]) and get bin 0's mass as the total minus the rest. index_add_ into float64 (bincount
        # of an empty input is int64).
        high_p = probs[probs * m >= 1]
        mass = torch.zeros(m, dtype=torch.float64, device=dev)
        mass.index_add_(0, self._bin(high_p), high_p.double())
        mass[0] = probs.sum(dtype=torch.float64) - mass[1:].sum()
        p_y = probs.gather(-1, labels[:, None]).squeeze(-1)  # [N]
        hits = torch.zeros(m, dtype=torch.float64, device=dev)
        hits.index_add_(0, self._bin(p_y), torch.ones_like(p_y, dtype=torch.float64))
        conf, pred = probs.max(-1)
        bt = self._bin(conf)
        for acc, w in (
            (self.top_count, torch.ones_like(conf, dtype=torch.float64)),
            (self.top_correct, (pred == labels).double()),
            (self.top_conf, conf.double()),
        ):
            acc += torch.zeros(m, dtype=torch.float64, device=dev).index_add_(0, bt, w).cpu()
        self.mass += mass.cpu()
        self.hits += hits.cpu()
        self.num_tokens += int(labels.numel())

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, max_rows: int = 1024) -> None:
        """Accumulate logits ``[..., V]`` (``logits[..., t, :]`` predicts ``labels[..., t]``) for labels ``[...]``."""
        v = logits.size(-1)
        flat, y = logits.reshape(-1, v), labels.reshape(-1).to(logits.device)  # [..., V] -> [N, V]
        keep = y != self.ignore_index
        flat, y = flat[keep], y[keep]
        for s in range(0, y.numel(), max_rows):
            self.update_probs(torch.softmax(flat[s : s + max_rows].float(), dim=-1), y[s : s + max_rows])

    def compute(self) -> dict[str, object]:
        """Return ``full_ece``, ``ece_top1``, ``num_tokens`` and the per-bin ``bins_hits`` / ``bins_mass``."""
        n = max(self.num_tokens, 1)
        return {
            "full_ece": float((self.hits - self.mass).abs().sum() / n),
            "ece_top1": float((self.top_correct - self.top_conf).abs().sum() / n),
            "num_tokens": self.num_tokens,
            "n_bins": self.n_bins,
            "bins_hits": self.hits.tolist(),
            "bins_mass": self.mass.tolist(),
        }


@torch.no_grad()
def full_ece_of_model(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    n_bins: int = 10,
    ignore_index: int = -100,
    max_batches: int | None = None,
) -> dict[str, object]:
    """Full-ECE of a torchtune model on held-out batches (``tokens`` / shifted ``labels``, ``[B, S]``)."""
    metric = FullECE(n_bins, ignore_index)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            for logits, y in single_chunks(model(batch["tokens"].to(device)), batch["labels"]):
                metric.update(logits, y)
    finally:
        model.train(was_training)
    return metric.compute()
