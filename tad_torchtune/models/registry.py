"""Model specs: ``(family, builder kwargs)`` for every builder, so one place knows how to build,
convert and export a model.

A *family* is an architecture with one component builder and one HF format:

==========  =============================================  ============================  ===================
family      component builder                              HF class                      checkpointer type
==========  =============================================  ============================  ===================
``qwen2``   ``torchtune.models.qwen2.qwen2``               ``Qwen2ForCausalLM``          ``QWEN2``
``llama2``  ``torchtune.models.llama2.llama2``             ``LlamaForCausalLM``          ``LLAMA2``
``llama3``  ``torchtune.models.llama3.llama3``             ``LlamaForCausalLM``          ``LLAMA3``
``phi3``    ``torchtune.models.phi3.phi3``                 ``Phi3ForCausalLM``           ``PHI3_MINI``
``phi2``    :func:`tad_torchtune.models.phi2.phi2`         ``PhiForCausalLM``            ``PHI2`` (ours)
``gemma2``  :func:`tad_torchtune.models.gemma2.gemma2`     ``Gemma2ForCausalLM``         ``GEMMA2`` (ours)
``qwen3``   :func:`tad_torchtune.models.qwen3.qwen3`       ``Qwen3ForCausalLM``          ``QWEN3`` (ours)
``llama3_1`` ``torchtune.models.llama3_1.llama3_1``        ``LlamaForCausalLM``          ``LLAMA3``
``llama3_2`` ``torchtune.models.llama3_2.llama3_2``        ``LlamaForCausalLM``          ``LLAMA3_2``
==========  =============================================  ============================  ===================

``llama3_1`` / ``llama3_2`` are Llama-3 with the "llama3" RoPE frequency scaling (factor 8 / 32) and, for
3.2, tied embeddings by default.

:data:`NAMED` holds the paper's models (teachers, pretrained students and the Table 8 students).
:func:`resolve` turns a YAML ``model`` node (``_component_`` + kwargs) into ``(family, full kwargs)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["FAMILIES", "NAMED", "component_builder", "build", "resolve", "CHECKPOINTER_MODEL_TYPE"]

FAMILIES = ("qwen2", "llama2", "llama3", "phi3", "phi2", "gemma2", "qwen3", "llama3_1", "llama3_2")

CHECKPOINTER_MODEL_TYPE = {
    "qwen2": "QWEN2",
    "llama2": "LLAMA2",
    "llama3": "LLAMA3",
    "phi3": "PHI3_MINI",
    "phi2": "PHI2",
    "gemma2": "GEMMA2",
    "qwen3": "QWEN3",
    "llama3_1": "LLAMA3",
    "llama3_2": "LLAMA3_2",
}

_QWEN = dict(vocab_size=151_936, norm_eps=1e-6, rope_base=1_000_000.0)

_QWEN3 = dict(vocab_size=151_936, norm_eps=1e-6, rope_base=1_000_000.0, head_dim=128, max_seq_len=40960)
_LLAMA3 = dict(vocab_size=128_256, norm_eps=1e-5, rope_base=500_000, max_seq_len=131072)

# name -> (family, kwargs of the family's component builder)
NAMED: dict[str, tuple[str, dict[str, Any]]] = {
    # ---- teachers and pretrained students (dims of the HF config.json)
    "qwen1_5_1_8b": (
        "qwen2",
        dict(_QWEN, num_layers=24, num_heads=16, num_kv_heads=16, embed_dim=2048, intermediate_dim=5504,
             max_seq_len=32768, tie_word_embeddings=False),
    ),
    "qwen1_5_0_5b": (
        "qwen2",
        dict(_QWEN, num_layers=24, num_heads=16, num_kv_heads=16, embed_dim=1024, intermediate_dim=2816,
             max_seq_len=32768, tie_word_embeddings=True),
    ),
    "qwen2_5_3b": (
        "qwen2",
        dict(_QWEN, num_layers=36, num_heads=16, num_kv_heads=2, embed_dim=2048, intermediate_dim=11008,
             max_seq_len=32768, tie_word_embeddings=True),
    ),
    "phi2_2_7b": (
        "phi2",
        dict(vocab_size=51_200, num_layers=32, num_heads=32, embed_dim=2560, intermediate_dim=10_240,
             max_seq_len=2048, partial_rotary_factor=0.4, rope_base=10_000.0, norm_eps=1e-5),
    ),
    "gemma2_9b": (
        "gemma2",
        dict(vocab_size=256_000, num_layers=42, num_heads=16, head_dim=256, num_kv_heads=8, embed_dim=3584,
             intermediate_dim=14_336, max_seq_len=8192, query_pre_attn_scalar=256),
    ),
    "gemma2_2b": (
        "gemma2",
        dict(vocab_size=256_000, num_layers=26, num_heads=8, head_dim=256, num_kv_heads=4, embed_dim=2304,
             intermediate_dim=9216, max_seq_len=8192, query_pre_attn_scalar=256),
    ),
    "phi3_mini": (
        "phi3",
        dict(vocab_size=32_064, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=3072, intermediate_dim=8192,
             max_seq_len=4096, norm_eps=1e-5),
    ),
    "phi3_medium": (
        "phi3",
        dict(vocab_size=32_064, num_layers=40, num_heads=40, num_kv_heads=10, embed_dim=5120, intermediate_dim=17_920,
             max_seq_len=4096, norm_eps=1e-5),
    ),
    "tinyllama_1_1b": (
        "llama2",
        dict(vocab_size=32_000, num_layers=22, num_heads=32, num_kv_heads=4, embed_dim=2048, intermediate_dim=5632,
             max_seq_len=2048, norm_eps=1e-5),
    ),
    "llama2_7b": (
        "llama2",
        dict(vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008,
             max_seq_len=4096, norm_eps=1e-5),
    ),
    # ---- current families (issue 18): Qwen3 dense, Llama-3.1/3.2, Qwen2.5 (dims of the HF config.json)
    "qwen3_0_6b": (
        "qwen3",
        dict(_QWEN3, num_layers=28, num_heads=16, num_kv_heads=8, embed_dim=1024, intermediate_dim=3072,
             tie_word_embeddings=True),
    ),
    "qwen3_1_7b": (
        "qwen3",
        dict(_QWEN3, num_layers=28, num_heads=16, num_kv_heads=8, embed_dim=2048, intermediate_dim=6144,
             tie_word_embeddings=True),
    ),
    "qwen3_4b": (
        "qwen3",
        dict(_QWEN3, num_layers=36, num_heads=32, num_kv_heads=8, embed_dim=2560, intermediate_dim=9728,
             tie_word_embeddings=True),
    ),
    "qwen3_8b": (
        "qwen3",
        dict(_QWEN3, num_layers=36, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=12288,
             tie_word_embeddings=False),
    ),
    "qwen3_14b": (
        "qwen3",
        dict(_QWEN3, num_layers=40, num_heads=40, num_kv_heads=8, embed_dim=5120, intermediate_dim=17408,
             tie_word_embeddings=False),
    ),
    "llama3_1_8b": (
        "llama3_1",
        dict(_LLAMA3, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336,
             scale_factor=8),
    ),
    "llama3_2_1b": (
        "llama3_2",
        dict(_LLAMA3, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192,
             scale_factor=32, tie_word_embeddings=True),
    ),
    "qwen2_5_7b": (
        "qwen2",
        dict(_QWEN, vocab_size=152_064, num_layers=28, num_heads=28, num_kv_heads=4, embed_dim=3584,
             intermediate_dim=18944, max_seq_len=131072, tie_word_embeddings=False),
    ),
    "qwen2_5_1_5b": (
        "qwen2",
        dict(_QWEN, num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536, intermediate_dim=8960,
             max_seq_len=131072, tie_word_embeddings=True),
    ),
    "qwen2_5_0_5b": (
        "qwen2",
        dict(_QWEN, num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896, intermediate_dim=4864,
             max_seq_len=32768, tie_word_embeddings=True),
    ),
    # ---- Table 8 students (pretraining from scratch)
    "qwen1_5_student_1_2b": (
        "qwen2",
        dict(_QWEN, num_layers=24, num_heads=16, num_kv_heads=16, embed_dim=1536, intermediate_dim=4224,
             max_seq_len=2048, tie_word_embeddings=False),
    ),
    "qwen1_5_student_0_5b": (
        "qwen2",
        dict(_QWEN, num_layers=24, num_heads=16, num_kv_heads=16, embed_dim=1024, intermediate_dim=2816,
             max_seq_len=2048, tie_word_embeddings=True),
    ),
    "phi2_student_1_1b": (
        "phi2",
        dict(vocab_size=51_200, num_layers=16, num_heads=32, embed_dim=2560, intermediate_dim=5120,
             max_seq_len=2048, partial_rotary_factor=0.4, rope_base=10_000.0, norm_eps=1e-5),
    ),
    "qwen2_5_student_1_2b": (
        "qwen2",
        dict(_QWEN, num_layers=18, num_heads=16, num_kv_heads=2, embed_dim=2048, intermediate_dim=7680,
             max_seq_len=2048, tie_word_embeddings=True),
    ),
    "gemma2_student_2b": (
        "gemma2",
        dict(vocab_size=256_000, num_layers=14, num_heads=16, head_dim=256, num_kv_heads=8, embed_dim=3584,
             intermediate_dim=4096, max_seq_len=8192, query_pre_attn_scalar=256),
    ),
}  # fmt: skip


def component_builder(family: str) -> Callable[..., nn.Module]:
    """The component builder of a family (imported lazily)."""
    if family == "qwen2":
        from torchtune.models.qwen2 import qwen2 as fn
    elif family == "llama2":
        from torchtune.models.llama2 import llama2 as fn
    elif family == "llama3":
        from torchtune.models.llama3 import llama3 as fn
    elif family == "phi3":
        from torchtune.models.phi3 import phi3 as fn
    elif family == "phi2":
        from tad_torchtune.models.phi2 import phi2 as fn
    elif family == "gemma2":
        from tad_torchtune.models.gemma2 import gemma2 as fn
    elif family == "qwen3":
        from tad_torchtune.models.qwen3 import qwen3 as fn
    elif family == "llama3_1":
        from torchtune.models.llama3_1 import llama3_1 as fn
    elif family == "llama3_2":
        from torchtune.models.llama3_2 import llama3_2 as fn
    else:
        raise ValueError(f"unknown model family {family!r}; known: {FAMILIES}")
    return fn


def build(name: str, **overrides: Any) -> nn.Module:
    """Build a named model (:data:`NAMED`), with keyword overrides (e.g. ``max_seq_len=2048``)."""
    family, kwargs = NAMED[name]
    return component_builder(family)(**{**kwargs, **overrides})


# dotted component paths (as written in YAML) -> family
_COMPONENT_PATHS = {
    "torchtune.models.qwen2.qwen2": "qwen2",
    "torchtune.models.qwen2._component_builders.qwen2": "qwen2",
    "torchtune.models.llama2.llama2": "llama2",
    "torchtune.models.llama2._component_builders.llama2": "llama2",
    "torchtune.models.llama3.llama3": "llama3",
    "torchtune.models.llama3._component_builders.llama3": "llama3",
    "torchtune.models.phi3.phi3": "phi3",
    "torchtune.models.phi3._component_builders.phi3": "phi3",
    "tad_torchtune.models.phi2": "phi2",
    "tad_torchtune.models.phi2.phi2": "phi2",
    "tad_torchtune.models.gemma2": "gemma2",
    "tad_torchtune.models.gemma2.gemma2": "gemma2",
    "tad_torchtune.models.qwen3": "qwen3",  # the package attribute (the submodule name is shadowed by it)
    "torchtune.models.llama3_1.llama3_1": "llama3_1",
    "torchtune.models.llama3_1._component_builders.llama3_1": "llama3_1",
    "torchtune.models.llama3_2.llama3_2": "llama3_2",
    "torchtune.models.llama3_2._component_builders.llama3_2": "llama3_2",
}


# Builders elsewhere in the package that wrap a family's component builder with some arguments fixed.
THIN_WRAPPERS = {
    "tad_torchtune.demo.smollm2.smollm2": "torchtune.models.llama3._component_builders.llama3",
}


def resolve(model_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(family, full component kwargs)`` for a YAML model node.

    Args:
        model_cfg (Mapping[str, Any]): ``{"_component_": path, **kwargs}``, where ``path`` is one of our named
            builders (``tad_torchtune.models.qwen1_5_1_8b``, ``tad_torchtune.models.students.phi2_student_1_1b``,
            ...) or a family component builder (``torchtune.models.qwen2.qwen2`` ...).

    Returns:
        tuple[str, dict[str, Any]]: the family and every argument of its component builder (defaults filled).

    Raises:
        ValueError: for a builder we cannot map to a family (name and fix in the message).
    """
    cfg = dict(model_cfg)
    path = str(cfg.pop("_component_"))
    name = path.rsplit(".", 1)[-1]
    if path in THIN_WRAPPERS:
        # A builder that only fixes some arguments of a family's component builder: its defaults, then the node.
        from torchtune.config._utils import _get_component_from_path

        sig = inspect.signature(_get_component_from_path(path))
        defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        cfg = {**defaults, **cfg}
        path = THIN_WRAPPERS[path]
    if path in _COMPONENT_PATHS:
        family, kwargs = _COMPONENT_PATHS[path], cfg
    elif path.startswith("tad_torchtune.models") and name in NAMED:
        family, base = NAMED[name]
        kwargs = {**base, **cfg}
    else:
        raise ValueError(
            f"cannot tell the architecture of model._component_={path!r}; use one of tad_torchtune.models' "
            f"named builders ({', '.join(sorted(NAMED))}) "
            f"or a component builder ({', '.join(sorted(_COMPONENT_PATHS))})"
        )
    sig = inspect.signature(component_builder(family))
    full = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    full.update(kwargs)
    missing = [k for k, p in sig.parameters.items() if p.default is inspect.Parameter.empty and k not in full]
    if missing:
        raise ValueError(f"model node for {path!r} lacks required arguments {missing}")
    return family, full
