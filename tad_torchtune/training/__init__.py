"""Helpers the ``knowledge_distillation_tad`` recipe needs that do not belong in its one readable file.

- :mod:`.loss_path`: whether a run takes the fused loss path (the recipe and ``tad-tune plan`` ask it).
- :mod:`.outputs`: chunked output logits with ``tensor_split`` and hidden-state capture for the cosine loss.
"""

from tad_torchtune.training.outputs import HiddenStateCapture, cosine_distance_sum, use_tensor_split_output

__all__ = [
    "HiddenStateCapture",
    "cosine_distance_sum",
    "use_tensor_split_output",
]
