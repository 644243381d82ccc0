"""Distillation divergences: TAD and the paper's baselines, one chunked interface (imports only torch)."""

from tad_torchtune.losses.base import ChunkedDivergenceLoss
from tad_torchtune.losses.baselines import ForwardKLLoss, JSDLoss, ReverseKLLoss, SymmetricKLLoss, ToDiLoss
from tad_torchtune.losses.tad import TADLoss

__all__ = [
    "ChunkedDivergenceLoss",
    "ForwardKLLoss",
    "JSDLoss",
    "ReverseKLLoss",
    "SymmetricKLLoss",
    "TADLoss",
    "ToDiLoss",
]
