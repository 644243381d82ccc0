"""Builders for the paper's teachers and pretrained students, usable from YAML by ``_component_`` path.

Each builds its family's component builder with the dims of the HF ``config.json`` (kept in
:data:`tad_torchtune.models.registry.NAMED`); torchtune's own builders are reproduced exactly where they
exist (``qwen2_5_3b``, ``phi3_mini``, ``llama2_7b``; a test checks the parameter counts agree).

=================  ==========================================  ===================  ==========
model              ``_component_``                             checkpointer type    params
=================  ==========================================  ===================  ==========
Qwen1.5-1.8B       ``tad_torchtune.models.qwen1_5_1_8b``       ``QWEN2``            1.837B
Qwen1.5-0.5B       ``tad_torchtune.models.qwen1_5_0_5b``       ``QWEN2``            0.464B
Qwen2.5-3B         ``tad_torchtune.models.qwen2_5_3b``         ``QWEN2``            3.086B
Phi-2              ``tad_torchtune.models.phi2_2_7b``          ``PHI2`` (ours)      2.780B
Gemma-2-9B         ``tad_torchtune.models.gemma2_9b``          ``GEMMA2`` (fixed)   9.242B
Phi-3-mini-4k      ``tad_torchtune.models.phi3_mini``          ``PHI3_MINI``        3.821B
Phi-3-medium-4k    ``tad_torchtune.models.phi3_medium``        ``PHI3_MINI``        13.960B
TinyLlama-1.1B     ``tad_torchtune.models.tinyllama_1_1b``     ``LLAMA2``           1.100B
Llama-2-7B         ``tad_torchtune.models.llama2_7b``          ``LLAMA2``           6.738B
Llama-3.1-8B       ``tad_torchtune.models.llama3_1_8b``        ``LLAMA3``           8.030B
Llama-3.2-1B       ``tad_torchtune.models.llama3_2_1b``        ``LLAMA3_2``         1.236B
Qwen2.5-7B         ``tad_torchtune.models.qwen2_5_7b``         ``QWEN2``            7.616B
Qwen2.5-1.5B       ``tad_torchtune.models.qwen2_5_1_5b``       ``QWEN2``            1.544B
Qwen2.5-0.5B       ``tad_torchtune.models.qwen2_5_0_5b``       ``QWEN2``            0.494B
=================  ==========================================  ===================  ==========

Qwen3 (0.6B to 14B) is in :mod:`tad_torchtune.models.qwen3` (``model_type: QWEN3``, ours). The Llama-3.x and
Qwen2.5 builders reproduce torchtune's ``llama3_1_8b``, ``llama3_2_1b``, ``qwen2_5_7b_base``,
``qwen2_5_1_5b_base`` and ``qwen2_5_0_5b`` and add ``max_seq_len`` (their RoPE caches otherwise cover
128k positions).

Checkpoints load with :class:`tad_torchtune.models.HFCheckpointer` (torchtune's HF checkpointer plus
``PHI2`` and a corrected ``GEMMA2``). Phi-3-medium: only the 4k-context variant (the 128k one needs
LongRoPE, which torchtune's Phi-3 RoPE lacks).
"""

from __future__ import annotations

from torchtune.modules import TransformerDecoder

from tad_torchtune.models.registry import build

__all__ = [
    "qwen1_5_1_8b",
    "qwen1_5_0_5b",
    "qwen2_5_3b",
    "phi3_mini",
    "phi3_medium",
    "tinyllama_1_1b",
    "llama2_7b",
    "llama3_1_8b",
    "llama3_2_1b",
    "qwen2_5_7b",
    "qwen2_5_1_5b",
    "qwen2_5_0_5b",
]


def qwen1_5_1_8b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen1.5-1.8B (``Qwen/Qwen1.5-1.8B``): 24 layers, D=2048, 16 MHA heads, FFN 5504, untied, V=151936."""
    return build("qwen1_5_1_8b", max_seq_len=max_seq_len)


def qwen1_5_0_5b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen1.5-0.5B (``Qwen/Qwen1.5-0.5B``): 24 layers, D=1024, 16 MHA heads, FFN 2816, tied, V=151936."""
    return build("qwen1_5_0_5b", max_seq_len=max_seq_len)


def qwen2_5_3b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen2.5-3B (``Qwen/Qwen2.5-3B``): 36 layers, D=2048, 16/2 heads, FFN 11008, tied, V=151936."""
    return build("qwen2_5_3b", max_seq_len=max_seq_len)


def phi3_mini(max_seq_len: int = 4096) -> TransformerDecoder:
    """Phi-3-mini-4k (``microsoft/Phi-3-mini-4k-instruct``): 32 layers, D=3072, 32 heads, V=32064."""
    return build("phi3_mini", max_seq_len=max_seq_len)


def phi3_medium(max_seq_len: int = 4096) -> TransformerDecoder:
    """Phi-3-medium-4k (``microsoft/Phi-3-medium-4k-instruct``, 14B): 40 layers, D=5120, 40/10 heads, V=32064."""
    return build("phi3_medium", max_seq_len=max_seq_len)


def tinyllama_1_1b(max_seq_len: int = 2048) -> TransformerDecoder:
    """TinyLlama-1.1B (``TinyLlama/TinyLlama-1.1B-intermediate-step-480k-1T`` etc.): 22 layers, D=2048, 32/4."""
    return build("tinyllama_1_1b", max_seq_len=max_seq_len)


def llama2_7b(max_seq_len: int = 4096) -> TransformerDecoder:
    """Llama-2-7B (``meta-llama/Llama-2-7b-hf``): 32 layers, D=4096, 32 heads, FFN 11008, V=32000."""
    return build("llama2_7b", max_seq_len=max_seq_len)


def llama3_1_8b(max_seq_len: int = 131072) -> TransformerDecoder:
    """Llama-3.1-8B (``meta-llama/Llama-3.1-8B``): 32 layers, D=4096, 32/8 heads, FFN 14336, untied, V=128256."""
    return build("llama3_1_8b", max_seq_len=max_seq_len)


def llama3_2_1b(max_seq_len: int = 131072) -> TransformerDecoder:
    """Llama-3.2-1B (``meta-llama/Llama-3.2-1B``): 16 layers, D=2048, 32/8 heads of 64, FFN 8192, tied, V=128256."""
    return build("llama3_2_1b", max_seq_len=max_seq_len)


def qwen2_5_7b(max_seq_len: int = 131072) -> TransformerDecoder:
    """Qwen2.5-7B (``Qwen/Qwen2.5-7B``): 28 layers, D=3584, 28/4 heads, FFN 18944, untied, V=152064."""
    return build("qwen2_5_7b", max_seq_len=max_seq_len)


def qwen2_5_1_5b(max_seq_len: int = 131072) -> TransformerDecoder:
    """Qwen2.5-1.5B (``Qwen/Qwen2.5-1.5B``): 28 layers, D=1536, 12/2 heads, FFN 8960, tied, V=151936."""
    return build("qwen2_5_1_5b", max_seq_len=max_seq_len)


def qwen2_5_0_5b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen2.5-0.5B (``Qwen/Qwen2.5-0.5B``): 24 layers, D=896, 14/2 heads, FFN 4864, tied, V=151936."""
    return build("qwen2_5_0_5b", max_seq_len=max_seq_len)


def gemma2_9b(max_seq_len: int = 8192, attn_impl: str = "eager") -> TransformerDecoder:
    """Gemma-2-9B (``google/gemma-2-9b``): 42 layers, D=3584, 16/8 heads of 256, FFN 14336, V=256000."""
    return build("gemma2_9b", max_seq_len=max_seq_len, attn_impl=attn_impl)


def gemma2_2b(max_seq_len: int = 8192, attn_impl: str = "eager") -> TransformerDecoder:
    """Gemma-2-2B (``google/gemma-2-2b``): 26 layers, D=2304, 8/4 heads of 256, FFN 9216, V=256000."""
    return build("gemma2_2b", max_seq_len=max_seq_len, attn_impl=attn_impl)


def phi2_2_7b(max_seq_len: int = 2048) -> TransformerDecoder:
    """Phi-2 (``microsoft/phi-2``, 2.78B): 32 layers, D=2560, 32 heads, FFN 10240, V=51200."""
    return build("phi2_2_7b", max_seq_len=max_seq_len)


def qwen3_0_6b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3-0.6B (``Qwen/Qwen3-0.6B-Base``): 28 layers, D=1024, 16/8 heads of 128, FFN 3072, tied."""
    return build("qwen3_0_6b", max_seq_len=max_seq_len)


def qwen3_1_7b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3-1.7B (``Qwen/Qwen3-1.7B-Base``): 28 layers, D=2048, 16/8 heads of 128, FFN 6144, tied."""
    return build("qwen3_1_7b", max_seq_len=max_seq_len)


def qwen3_4b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3-4B (``Qwen/Qwen3-4B-Base``): 36 layers, D=2560, 32/8 heads of 128, FFN 9728, tied."""
    return build("qwen3_4b", max_seq_len=max_seq_len)


def qwen3_8b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3-8B (``Qwen/Qwen3-8B-Base``): 36 layers, D=4096, 32/8 heads of 128, FFN 12288, untied."""
    return build("qwen3_8b", max_seq_len=max_seq_len)


def qwen3_14b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3-14B (``Qwen/Qwen3-14B-Base``): 40 layers, D=5120, 40/8 heads of 128, FFN 17408, untied."""
    return build("qwen3_14b", max_seq_len=max_seq_len)
