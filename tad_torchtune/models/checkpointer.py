"""``HFCheckpointer``: torchtune's ``FullModelHFCheckpointer`` plus Phi-2, Qwen3 and a corrected Gemma-2.

Use it exactly like the torchtune class (same arguments, same ``load_checkpoint`` / ``save_checkpoint``,
same output layout: sharded safetensors + index + copied ``config.json`` / tokenizer files), with
``model_type`` one of torchtune's ``ModelType`` names or:

* ``PHI2`` -- HF ``PhiForCausalLM`` <-> :func:`tad_torchtune.models.phi2.phi2` (new architecture);
* ``QWEN3`` -- HF ``Qwen3ForCausalLM`` <-> :func:`tad_torchtune.models.qwen3.qwen3` (new architecture; the
  tied models' ``lm_head`` is neither read nor written, as for ``QWEN2``);
* ``GEMMA2`` -- HF ``Gemma2ForCausalLM`` <-> :func:`tad_torchtune.models.gemma2.gemma2`, with the
  pre/post feed-forward norms mapped the right way round (torchtune 0.6.1 swaps them, #2850).

Every other ``model_type`` behaves exactly as in torchtune. How: torchtune's checkpointer imports its
converter inside ``load_checkpoint``/``save_checkpoint`` from the converter module, so for the duration of
those two calls (only) we point that module attribute at our converter. Nothing is patched globally.

Example (YAML)::

    checkpointer:
      _component_: tad_torchtune.models.HFCheckpointer
      checkpoint_dir: /models/phi-2
      checkpoint_files: [model-00001-of-00002.safetensors, model-00002-of-00002.safetensors]
      model_type: PHI2
      output_dir: ${output_dir}/teacher
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torchtune.training import FullModelHFCheckpointer

__all__ = ["HFCheckpointer", "CUSTOM_MODEL_TYPES"]

# our name -> (torchtune ModelType whose code path we reuse, module whose converters we swap, their names)
CUSTOM_MODEL_TYPES = {
    "PHI2": ("PHI3_MINI", "torchtune.models.phi3._convert_weights", ("phi3_hf_to_tune", "phi3_tune_to_hf")),
    "GEMMA2": ("GEMMA2", "torchtune.models.gemma2._convert_weights", ("gemma2_hf_to_tune", "gemma2_tune_to_hf")),
    "QWEN3": ("QWEN2", "torchtune.models.qwen2._convert_weights", ("qwen2_hf_to_tune", "qwen2_tune_to_hf")),
}


class HFCheckpointer(FullModelHFCheckpointer):
    """``FullModelHFCheckpointer`` that also handles ``model_type: PHI2`` / ``QWEN3`` and fixes ``GEMMA2``.

    Args:
        checkpoint_dir (str): HF model directory (with ``config.json``).
        checkpoint_files (list[str] | dict[str, str]): safetensors files, as for torchtune.
        model_type (str): a torchtune ``ModelType`` name, ``PHI2``, ``QWEN3`` or ``GEMMA2``.
        output_dir (str): where ``epoch_N/`` directories are written.
        **kwargs: passed to ``FullModelHFCheckpointer`` (``recipe_checkpoint``, ``resume_from_checkpoint``,
            ``safe_serialization``, ``should_load_recipe_state``, ...).
    """

    def __init__(self, checkpoint_dir: str, checkpoint_files: Any, model_type: str, output_dir: str, **kwargs) -> None:
        self._tad_model_type = str(model_type).upper()
        base_type = CUSTOM_MODEL_TYPES.get(self._tad_model_type, (self._tad_model_type,))[0]
        super().__init__(
            checkpoint_dir=checkpoint_dir,
            checkpoint_files=checkpoint_files,
            model_type=base_type,
            output_dir=output_dir,
            **kwargs,
        )

    @contextlib.contextmanager
    def _our_converters(self) -> Iterator[None]:
        if self._tad_model_type not in CUSTOM_MODEL_TYPES:
            yield
            return
        import importlib

        _, mod_name, (to_tune_name, to_hf_name) = CUSTOM_MODEL_TYPES[self._tad_model_type]
        mod = importlib.import_module(mod_name)
        cfg = self._config
        if self._tad_model_type == "PHI2":
            from tad_torchtune.models.phi2 import phi2_hf_to_tune, phi2_tune_to_hf

            to_tune, to_hf = phi2_hf_to_tune, phi2_tune_to_hf
        elif self._tad_model_type == "QWEN3":
            from tad_torchtune.models.qwen3 import qwen3_hf_to_tune, qwen3_tune_to_hf

            to_tune, to_hf = qwen3_hf_to_tune, qwen3_tune_to_hf  # tie_word_embeddings comes as a keyword
        else:
            from tad_torchtune.models.gemma2 import gemma2_hf_to_tune, gemma2_tune_to_hf

            def to_tune(sd, **_):
                return gemma2_hf_to_tune(
                    sd, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"], cfg.get("head_dim")
                )

            def to_hf(sd, **_):
                return gemma2_tune_to_hf(
                    sd, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"], cfg.get("head_dim")
                )

        saved = getattr(mod, to_tune_name), getattr(mod, to_hf_name)
        setattr(mod, to_tune_name, to_tune)
        setattr(mod, to_hf_name, to_hf)
        try:
            yield
        finally:
            setattr(mod, to_tune_name, saved[0])
            setattr(mod, to_hf_name, saved[1])

    def load_checkpoint(self) -> dict[str, Any]:
        """Load and convert to torchtune naming (see torchtune's ``FullModelHFCheckpointer.load_checkpoint``)."""
        with self._our_converters():
            return super().load_checkpoint()

    def save_checkpoint(self, state_dict: dict[str, Any], epoch: int, *args, **kwargs) -> None:
        """Convert back to HF naming and write ``output_dir/epoch_{epoch}/`` (torchtune's layout)."""
        with self._our_converters():
            return super().save_checkpoint(state_dict, epoch, *args, **kwargs)
