"""tad_torchtune: Tail-Aware Distillation (arXiv 2602.20816) for torchtune 0.6.1.

Public names are the ones configs reference by ``_component_`` path, e.g.
``kd_loss._component_=tad_torchtune.TADLoss``.
"""

from tad_torchtune import _quiet

_quiet.install()  # before torchtune/torchao are imported: drops three known uninformative messages

from tad_torchtune.losses import (  # noqa: E402
    ChunkedDivergenceLoss,
    ForwardKLLoss,
    FusedLinearDistillationLoss,
    FusedLinearForwardKLLoss,
    FusedLinearTADLoss,
    JSDLoss,
    ReverseKLLoss,
    SymmetricKLLoss,
    TADLoss,
    ToDiLoss,
)

__version__ = "0.1.0"

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
    "__version__",
]
