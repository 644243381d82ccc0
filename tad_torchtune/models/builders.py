"""Builders for the paper's teachers and pretrained students, usable from YAML by ``_component_`` path.

Where torchtune 0.6.1 has a correct builder we call it; where it lacks the size we call its component
builder with the dims of the HF ``config.json``; Phi-2 and Gemma-2 come from our own modules.

=====================  ==========================================  ==================  ===============
model                  builder                                     checkpoint format   params (meta)
=====================  ==========================================  ==================  ===============
Qwen1.5-1.8B           ``tad_torchtune.models.qwen1_5_1_8b``       HF, ``QWEN2``       1.837B
Qwen1.5-0.5B           ``tad_torchtune.models.qwen1_5_0_5b``       HF, ``QWEN2``       0.464B
Qwen2.5-3B             ``tad_torchtune.models.qwen2_5_3b``         HF, ``QWEN2``       3.086B
Phi-2                  ``tad_torchtune.models.phi2_2_7b``          HF, ``PHI2`` (ours) 2.780B
Gemma-2-9B             ``tad_torchtune.models.gemma2_9b``          HF, ``GEMMA2`` (ours fixed) 9.242B
Phi-3-mini-4k          ``tad_torchtune.models.phi3_mini``          HF, ``PHI3_MINI``   3.821B
Phi-3-medium-4k        ``tad_torchtune.models.phi3_medium``        HF, ``PHI3_MINI``   13.96B
TinyLlama-1.1B         ``tad_torchtune.models.tinyllama_1_1b``     HF, ``LLAMA2``      1.100B
Llama-2-7B             ``tad_torchtune.models.llama2_7b``          HF, ``LLAMA2``      6.738B
=====================  ==========================================  ==================  ===============

(``tests/models/test_param_counts.py`` checks the counts.) Checkpoints load with
:class:`tad_torchtune.models.HFCheckpointer`, which takes every torchtune ``model_type`` plus ``PHI2``
and a corrected ``GEMMA2``.
"""

from __future__ import annotations

from torchtune.models.llama2 import llama2
from torchtune.models.llama2 import llama2_7b as _llama2_7b
from torchtune.models.phi3 import phi3
from torchtune.models.phi3 import phi3_mini as _phi3_mini
from torchtune.models.qwen2 import qwen2
from torchtune.models.qwen2_5 import qwen2_5_3b as _qwen2_5_3b
from torchtune.modules import TransformerDecoder

__all__ = [
    "qwen1_5_1_8b",
    "qwen1_5_0_5b",
    "qwen2_5_3b",
    "phi3_mini",
    "phi3_medium",
    "tinyllama_1_1b",
    "llama2_7b",
]


def qwen1_5_1_8b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen1.5-1.8B (``Qwen/Qwen1.5-1.8B``): 24 layers, D=2048, 16 MHA heads, FFN 5504, untied, V=151936."""
    return qwen2(
        vocab_size=151_936,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        embed_dim=2048,
        intermediate_dim=5504,
        max_seq_len=max_seq_len,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=False,
    )


def qwen1_5_0_5b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen1.5-0.5B (``Qwen/Qwen1.5-0.5B``): 24 layers, D=1024, 16 MHA heads, FFN 2816, tied, V=151936."""
    return qwen2(
        vocab_size=151_936,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        embed_dim=1024,
        intermediate_dim=2816,
        max_seq_len=max_seq_len,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
    )


def qwen2_5_3b() -> TransformerDecoder:
    """Qwen2.5-3B (``Qwen/Qwen2.5-3B``): torchtune's builder (36 layers, D=2048, 16/2 heads, tied)."""
    return _qwen2_5_3b()


def phi3_mini() -> TransformerDecoder:
    """Phi-3-mini-4k (``microsoft/Phi-3-mini-4k-instruct``): torchtune's builder, V=32064."""
    return _phi3_mini()


def phi3_medium(max_seq_len: int = 4096) -> TransformerDecoder:
    """Phi-3-medium-4k (``microsoft/Phi-3-medium-4k-instruct``, 14B): 40 layers, D=5120, 40/10 heads.

    Only the 4k-context variant: the 128k one needs LongRoPE, which torchtune's Phi-3 RoPE lacks.
    """
    return phi3(
        vocab_size=32_064,
        num_layers=40,
        num_heads=40,
        num_kv_heads=10,
        embed_dim=5120,
        intermediate_dim=17_920,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
    )


def tinyllama_1_1b(max_seq_len: int = 2048) -> TransformerDecoder:
    """TinyLlama-1.1B (``TinyLlama/TinyLlama-1.1B-intermediate-step-480k-1T`` etc.): 22 layers, D=2048, 32/4."""
    return llama2(
        vocab_size=32_000,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        embed_dim=2048,
        intermediate_dim=5632,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
    )


def llama2_7b() -> TransformerDecoder:
    """Llama-2-7B (``meta-llama/Llama-2-7b-hf``): torchtune's builder."""
    return _llama2_7b()
