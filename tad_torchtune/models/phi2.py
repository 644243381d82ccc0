"""Phi-2 for torchtune (torchtune 0.6.1 has none), matching Hugging Face ``PhiForCausalLM``.

Phi-2 differs from the Llama family in four ways, each handled here:

* **Parallel block** -- one LayerNorm feeds both attention and MLP, whose outputs are added to the
  residual together: ``x + attn(ln(x)) + mlp(ln(x))`` (:class:`PhiParallelLayer`).
* **LayerNorm with bias** everywhere (``nn.LayerNorm``), not RMSNorm; GELU (tanh) MLP ``fc1 -> fc2``
  with biases; q/k/v/dense with biases.
* **Partial rotary** -- RoPE (rotate-half, as HF) on the first ``rotary_dim = head_dim * 0.4`` dims of
  each head only (:class:`PartialRotaryPositionalEmbeddings`).
* **Biased, untied output layer** ``lm_head``.

:func:`phi2_hf_to_tune` / :func:`phi2_tune_to_hf` convert weights (a pure renaming; no permutation is
needed because our RoPE uses HF's rotate-half layout).
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.models.convert_weights import get_mapped_key
from torchtune.models.phi3._position_embeddings import Phi3RotaryPositionalEmbeddings
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

__all__ = [
    "PartialRotaryPositionalEmbeddings",
    "PhiParallelLayer",
    "phi2",
    "phi2_hf_to_tune",
    "phi2_tune_to_hf",
]


class PartialRotaryPositionalEmbeddings(nn.Module):
    """Rotate-half RoPE on the first ``rotary_dim`` dims of each head; the rest pass through.

    Args:
        head_dim (int): per-head width.
        rotary_dim (int): rotated dims (even, ``<= head_dim``); Phi-2: ``int(80 * 0.4) = 32``.
        max_seq_len (int): cache length.
        base (float): RoPE theta. Default: 10000.0
    """

    rope_layout = "half"  # read by student_init: pairs (i, i + rotary_dim/2)

    def __init__(self, head_dim: int, rotary_dim: int, max_seq_len: int, base: float = 10_000.0) -> None:
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.rope = Phi3RotaryPositionalEmbeddings(dim=rotary_dim, max_seq_len=max_seq_len, base=base)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S, H, head_dim] -> same shape, first rotary_dim dims rotated."""
        rot = self.rope(x[..., : self.rotary_dim], input_pos=input_pos)
        return torch.cat([rot, x[..., self.rotary_dim :]], dim=-1)


class PhiParallelLayer(TransformerSelfAttentionLayer):
    """Phi parallel block: ``x + attn(ln(x)) + mlp(ln(x))`` with one shared ``sa_norm``.

    Subclasses ``TransformerSelfAttentionLayer`` so activation-checkpointing policies, KV-cache setup
    and FSDP wrapping written for torchtune layers apply unchanged.
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: nn.Module) -> None:
        super().__init__(attn=attn, mlp=mlp, sa_norm=norm)

    def forward(self, x: torch.Tensor, *, mask=None, input_pos=None, **kwargs) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        h = self.sa_norm(x)
        return x + self.attn(h, h, mask=mask, input_pos=input_pos) + self.mlp(h)


def phi2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    num_kv_heads: int | None = None,
    partial_rotary_factor: float = 0.4,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
) -> TransformerDecoder:
    """Phi-2-style decoder (parallel blocks, LayerNorm, partial RoPE, biased untied output).

    Args:
        vocab_size (int): rows of the embedding / output (51200 for Phi-2).
        num_layers (int): decoder layers.
        num_heads (int): attention heads.
        embed_dim (int): model width (``head_dim = embed_dim // num_heads``).
        intermediate_dim (int): MLP hidden width.
        max_seq_len (int): maximum sequence length.
        num_kv_heads (int | None): KV heads; None = MHA. Default: None
        partial_rotary_factor (float): fraction of each head rotated. Default: 0.4
        rope_base (float): RoPE theta. Default: 10000.0
        norm_eps (float): LayerNorm epsilon. Default: 1e-5
        attn_dropout (float): attention dropout. Default: 0.0

    Returns:
        TransformerDecoder: ``model(tokens [B, S]) -> logits [B, S, V]``.
    """
    num_kv_heads = num_kv_heads or num_heads
    head_dim = embed_dim // num_heads
    rope = PartialRotaryPositionalEmbeddings(
        head_dim, int(head_dim * partial_rotary_factor), max_seq_len=max_seq_len, base=rope_base
    )
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=True),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=True),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=True),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=True),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        mlp = FeedForward(
            gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=True),
            down_proj=nn.Linear(intermediate_dim, embed_dim, bias=True),
            activation=nn.GELU(approximate="tanh"),  # HF "gelu_new"
        )
        layers.append(PhiParallelLayer(attn, mlp, nn.LayerNorm(embed_dim, eps=norm_eps)))
    return TransformerDecoder(
        tok_embeddings=nn.Embedding(vocab_size, embed_dim),
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=nn.LayerNorm(embed_dim, eps=norm_eps),
        output=nn.Linear(embed_dim, vocab_size, bias=True),
    )


_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.dense.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.dense.bias": "layers.{}.attn.output_proj.bias",
    "model.layers.{}.mlp.fc1.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.fc1.bias": "layers.{}.mlp.w1.bias",
    "model.layers.{}.mlp.fc2.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.fc2.bias": "layers.{}.mlp.w2.bias",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.weight",
    "model.layers.{}.input_layernorm.bias": "layers.{}.sa_norm.bias",
    "model.final_layernorm.weight": "norm.weight",
    "model.final_layernorm.bias": "norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
}
_TO_HF = {v: k for k, v in _FROM_HF.items()}


def phi2_hf_to_tune(state_dict: dict[str, torch.Tensor], **_: object) -> dict[str, torch.Tensor]:
    """HF ``PhiForCausalLM`` state dict -> :func:`phi2` state dict (renaming only)."""
    return {get_mapped_key(k, _FROM_HF): v for k, v in state_dict.items() if "rotary_emb.inv_freq" not in k}


def phi2_tune_to_hf(state_dict: dict[str, torch.Tensor], **_: object) -> dict[str, torch.Tensor]:
    """Inverse of :func:`phi2_hf_to_tune`."""
    return {get_mapped_key(k, _TO_HF): v for k, v in state_dict.items()}
