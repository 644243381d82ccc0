"""Evaluation for TAD students: lm-eval model wrapper, eval recipe, Full-ECE and the paper's diagnostics.

Light imports only here (torch); ``lm_eval`` is imported by :mod:`tad_torchtune.eval.lm` when used.
"""

from tad_torchtune.eval.diagnostics import (
    HeldoutKLTracker,
    heldout_metrics,
    plot_heldout_kl,
    plot_tail_mass,
    read_heldout_csv,
    teacher_tail_stats,
    write_heldout_csv,
    write_tail_csv,
)
from tad_torchtune.eval.full_ece import FullECE, full_ece_of_model

__all__ = [
    "FullECE",
    "HeldoutKLTracker",
    "full_ece_of_model",
    "heldout_metrics",
    "plot_heldout_kl",
    "plot_tail_mass",
    "read_heldout_csv",
    "teacher_tail_stats",
    "write_heldout_csv",
    "write_tail_csv",
]
