"""Helpers the ``knowledge_distillation_tad`` recipe needs that do not belong in its one readable file.

- :mod:`.checkpoint`: atomic, resumable step checkpoints (model, optimizer, scheduler, data position, RNG).
- :mod:`.outputs`: chunked output logits with ``tensor_split`` and hidden-state capture for the cosine loss.
- :mod:`.byte_tokenizer`: an offline byte-level tokenizer implementing torchtune's ``ModelTokenizer``.
- :mod:`.tiny`: writes the tiny random teacher/student checkpoints and text data the tiny configs use.
"""

from tad_torchtune.training.byte_tokenizer import ByteTokenizer, byte_tokenizer
from tad_torchtune.training.checkpoint import find_latest_checkpoint, load_step_checkpoint, save_step_checkpoint
from tad_torchtune.training.outputs import HiddenStateCapture, cosine_distance_sum, use_tensor_split_output

__all__ = [
    "ByteTokenizer",
    "HiddenStateCapture",
    "byte_tokenizer",
    "cosine_distance_sum",
    "find_latest_checkpoint",
    "load_step_checkpoint",
    "save_step_checkpoint",
    "use_tensor_split_output",
]
