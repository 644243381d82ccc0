"""Distillation divergences: TAD and the paper's baselines, one chunked interface (imports only torch)."""

from tad_torchtune.losses.base import ChunkedDivergenceLoss
from tad_torchtune.losses.baselines import ForwardKLLoss, JSDLoss, ReverseKLLoss, SymmetricKLLoss, ToDiLoss
from tad_torchtune.losses.fused_linear import (
    FusedLinearDistillationLoss,
    FusedLinearForwardKLLoss,
    FusedLinearTADLoss,
)
from tad_torchtune.losses.tad import TADLoss

__all__ = [
    "ChunkedDivergenceLoss",
    "ForwardKLLoss",
    "FusedLinearDistillationLoss",
    "FusedLinearForwardKLLoss",
    "FusedLinearTADLoss",
    "JSDLoss",
    "ReverseKLLoss",
    "SymmetricKLLoss",
    "TADLoss",
    "ToDiLoss",
]
