"""Statistics of a grid: means and standard deviations over seeds, paired differences with t intervals.

A seed fixes the data order, and within a seed every variant sees the same batches from the same student
initialisation, so two variants are compared by the per-seed differences ``d_s = A_s - B_s`` over the seeds
both have: mean ``d``, sample standard deviation ``s_d`` and the two-sided 95 % Student-t interval
``d ± t_{0.975, n-1} · s_d / sqrt(n)``. A difference is "established" only where that interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["Summary", "PairedDifference", "summarize", "paired_difference"]


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``n - 1``) of ``n`` values; ``sd`` is NaN for one value."""

    mean: float
    sd: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.sd:.4f}" if self.n > 1 else f"{self.mean:.4f}"


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences A - B: their mean, sd, count and 95 % t interval (``low``, ``high``)."""

    mean: float
    sd: float
    n: int
    low: float
    high: float
    seeds: tuple[int, ...]

    @property
    def established(self) -> bool:
        """The interval excludes zero (needs at least two seeds)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        verdict = "established" if self.established else "not established"
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] (n={self.n}, {verdict})"


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation of ``values`` (at least one)."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return Summary(mean, sd, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedDifference:
    """The paired difference A - B over the seeds present in both mappings (``{seed: value}``).

    Raises:
        ValueError: when the two share no seed.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError("the two variants share no finished seed")
    d = [a[s] - b[s] for s in seeds]
    s = summarize(d)
    if s.n < 2:
        return PairedDifference(s.mean, float("nan"), 1, float("-inf"), float("inf"), seeds)
    half = float(student_t.ppf(0.5 + level / 2, s.n - 1)) * s.sd / math.sqrt(s.n)
    return PairedDifference(s.mean, s.sd, s.n, s.mean - half, s.mean + half, seeds)
