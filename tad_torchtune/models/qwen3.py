"""Qwen3 (dense) for torchtune (torchtune 0.6.1 has none), matching Hugging Face ``Qwen3ForCausalLM``.

Qwen3 is Qwen2 (RMSNorm, SwiGLU, GQA, rotate-half RoPE with base 1e6) with three changes, each handled here:

* **q/k RMSNorm per head, before RoPE** -- every query and key head is RMS-normalised over its ``head_dim``
  with one learned scale shared by all heads (HF ``q_norm``/``k_norm``), *then* rotated.
  torchtune 0.6.1's ``MultiHeadAttention`` has ``q_norm``/``k_norm`` but applies them *after* RoPE; the
  scale does not commute with the rotation (it weighs the two dims of a rotary pair differently), so
  :class:`Qwen3Attention` reorders them.
* **no q/k/v bias** (Qwen2 has them).
* **head_dim 128 independent of the width** -- e.g. Qwen3-0.6B: D=1024, 16 heads of 128, so the attention
  width ``H * head_dim`` = 2048 differs from ``D``.

Tied embeddings as the HF config says (0.6B, 1.7B, 4B tie; 8B, 14B do not). RoPE is torchtune's
``Qwen2RotaryPositionalEmbeddings`` (rotate-half, as HF), so HF <-> torchtune weights are a pure renaming
(:func:`qwen3_hf_to_tune` / :func:`qwen3_tune_to_hf`); no q/k permutation.

Dims (HF ``config.json``; all: ``head_dim=128``, ``rope_theta=1e6``, ``rms_norm_eps=1e-6``, V=151,936;
``max_position_embeddings`` 40,960 in the post-trained repos, 32,768 in the ``-Base`` ones; the builders'
``max_seq_len`` default is 40,960, only the RoPE cache length):

==========  ======  ====  ============  =====  ======  =======  ==============
model       layers  D     q/kv heads    FFN    tied    params   builder
==========  ======  ====  ============  =====  ======  =======  ==============
Qwen3-0.6B  28      1024  16 / 8        3072   yes     0.596B   ``qwen3_0_6b``
Qwen3-1.7B  28      2048  16 / 8        6144   yes     1.721B   ``qwen3_1_7b``
Qwen3-4B    36      2560  32 / 8        9728   yes     4.022B   ``qwen3_4b``
Qwen3-8B    36      4096  32 / 8        12288  no      8.191B   ``qwen3_8b``
Qwen3-14B   40      5120  40 / 8        17408  no      14.768B  ``qwen3_14b``
==========  ======  ====  ============  =====  ======  =======  ==============

From YAML: ``model._component_: tad_torchtune.models.qwen3_1_7b`` (named, with ``max_seq_len``), or
``tad_torchtune.models.qwen3`` with every dimension; checkpoints with ``HFCheckpointer`` and
``model_type: QWEN3``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.models.convert_weights import get_mapped_key
from torchtune.models.qwen2._component_builders import qwen2_mlp
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import (
    MultiHeadAttention,
    RMSNorm,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

__all__ = [
    "Qwen3Attention",
    "qwen3",
    "qwen3_hf_to_tune",
    "qwen3_tune_to_hf",
]


class Qwen3Attention(MultiHeadAttention):
    """torchtune ``MultiHeadAttention`` with the per-head q/k RMSNorm applied *before* RoPE, as HF Qwen3.

    Same constructor, attributes (``q_norm``, ``k_norm``, ``q_proj``, ...), KV cache and attention kernel
    (SDPA, or flex attention for packed block masks) as the parent; only the order of norm and RoPE differs.
    """

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask=None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention.

        Args:
            x (torch.Tensor): queries' input ``[B, S_x, D]``.
            y (torch.Tensor | None): keys'/values' input ``[B, S_y, D]`` (``x`` for self-attention); None
                reads the KV cache.
            mask: boolean ``[B, S_x, S_k]`` (True = attend) or a flex ``BlockMask``; None = causal.
            input_pos (torch.Tensor | None): positions ``[B, S_x]`` (packed samples / decoding). Default: None

        Returns:
            torch.Tensor: ``[B, S_x, D]``.
        """
        b, s_x, _ = x.shape
        q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
        q = self.q_norm(q)  # [B, S, H, hd], normalised over hd
        q = self.pos_embeddings(q, input_pos=input_pos).transpose(1, 2)  # [B, H, S, hd]
        if y is None:
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        else:
            s_y = y.shape[1]
            k = self.k_norm(self.k_proj(y).view(b, s_y, -1, self.head_dim))
            k = self.pos_embeddings(k, input_pos=input_pos).transpose(1, 2)  # [B, KV, S, hd]
            v = self.v_proj(y).view(b, s_y, -1, self.head_dim).transpose(1, 2)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)
        if self.num_heads != self.num_kv_heads:
            q_per_kv = self.num_heads // self.num_kv_heads
            shape = (b, self.num_kv_heads, q_per_kv, -1, self.head_dim)
            k = k.unsqueeze(2).expand(shape).flatten(1, 2)
            v = v.unsqueeze(2).expand(shape).flatten(1, 2)
        out = self._attention_call(
            q,
            k,
            v,
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.kv_cache is None and mask is None and self.is_causal,
        )
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))


def qwen3(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: int | None = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    tie_word_embeddings: bool = False,
) -> TransformerDecoder:
    """Qwen3 dense decoder (component builder; :func:`qwen3_8b` etc. fill in the published dims).

    Args:
        vocab_size (int): embedding rows ``V``.
        num_layers (int): decoder layers.
        num_heads (int): query heads ``H``.
        num_kv_heads (int): key/value heads (``H % num_kv_heads == 0``).
        embed_dim (int): model width ``D``.
        intermediate_dim (int): SwiGLU hidden width.
        max_seq_len (int): longest sequence (RoPE cache, KV cache).
        head_dim (int | None): per-head width; None means ``D // H``. Qwen3: 128. Default: None
        attn_dropout (float): attention dropout. Default: 0.0
        norm_eps (float): RMSNorm epsilon (also of the q/k norms). Default: 1e-6
        rope_base (float): RoPE theta. Default: 1e6
        tie_word_embeddings (bool): output projection = token embedding. Default: False

    Returns:
        TransformerDecoder: with :class:`Qwen3Attention` layers; ``[B, S]`` tokens -> ``[B, S, V]`` logits.
    """
    head_dim = head_dim or embed_dim // num_heads
    rope = Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = Qwen3Attention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope,
            q_norm=RMSNorm(dim=head_dim, eps=norm_eps),
            k_norm=RMSNorm(dim=head_dim, eps=norm_eps),
            kv_cache=None,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=qwen2_mlp(dim=embed_dim, hidden_dim=intermediate_dim),
                sa_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
                mlp_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
            )
        )
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=output,
    )


# HF name -> torchtune name ({} = layer index)
_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}
_TO_HF = {v: k for k, v in _FROM_HF.items()}


def qwen3_hf_to_tune(
    state_dict: dict[str, torch.Tensor], *, tie_word_embeddings: bool = False, **_: object
) -> dict[str, torch.Tensor]:
    """HF ``Qwen3ForCausalLM`` state dict -> torchtune naming (a renaming; RoPE layouts agree).

    Args:
        state_dict (dict[str, torch.Tensor]): HF tensors (all shards merged).
        tie_word_embeddings (bool): drop ``lm_head.weight`` (the tied output is the embedding). Default: False
        **_: ignored (the heads/dims torchtune's checkpointer passes to every converter).

    Returns:
        dict[str, torch.Tensor]: the same tensors under torchtune names.
    """
    out = {}
    for key, value in state_dict.items():
        if "rotary_emb.inv_freq" in key or (tie_word_embeddings and key == "lm_head.weight"):
            continue
        out[get_mapped_key(key, _FROM_HF)] = value
    return out


def qwen3_tune_to_hf(state_dict: dict[str, torch.Tensor], **_: object) -> dict[str, torch.Tensor]:
    """torchtune naming -> HF ``Qwen3ForCausalLM`` naming (a tied model has no ``output.weight`` to write)."""
    return {get_mapped_key(k, _TO_HF): v for k, v in state_dict.items()}
