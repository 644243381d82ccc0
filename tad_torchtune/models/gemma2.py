"""Gemma-2 for torchtune, matching Hugging Face ``Gemma2ForCausalLM`` (fixes torchtune 0.6.1's Gemma-2).

torchtune 0.6.1's ``gemma2`` gets four things wrong for HF checkpoints (read in its ``torchtune/models/gemma2/``):

1. Its HF weight map swaps ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``
   (torchtune#2850). :func:`gemma2_hf_to_tune` maps ``pre_feedforward_layernorm -> mlp_norm`` (applied
   *before* the MLP by ``TransformerSelfAttentionLayer``) and ``post_feedforward_layernorm -> mlp_scale``.
2. Its final soft-cap is applied to the last hidden state (``Gemma2FinalNorm``) instead of the logits.
   Here the final norm is a plain Gemma RMSNorm and the cap wraps the tied output projection
   (:class:`SoftcappedTiedLinear`): ``logits = c * tanh(W h / c)`` with ``c = final_logit_softcapping``.
3. Its model builders pass the two cap values swapped (attention 30, final 50). HF: attention 50, final 30.
4. Its attention is eager ``q @ k^T`` over the full ``S x S`` matrix. :class:`Gemma2Attention` keeps the
   exact soft-capped attention but processes queries in blocks (``q_block_size``) so the score matrix is
   ``[B, H, q_block, S]``, and offers ``attn_impl="flex"`` (``torch.nn.attention.flex_attention`` with the
   soft-cap as ``score_mod`` and the causal/sliding window as a block mask; compiled on CUDA) and
   ``attn_impl="sdpa"`` (fused SDPA; **drops the attention soft-cap**, an approximation -- HF refuses SDPA
   for Gemma-2 for the same reason).

Layers alternate sliding-window (even indices) and global attention, as HF's default ``layer_types``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.convert_weights import get_mapped_key
from torchtune.models.gemma._component_builders import gemma_mlp
from torchtune.models.gemma.gemma_norm_embedding import GemmaNormEmbeddings
from torchtune.models.gemma.rms_norm import GemmaRMSNorm
from torchtune.modules import (
    KVCache,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

__all__ = [
    "Gemma2Attention",
    "SoftcappedTiedLinear",
    "gemma2",
    "gemma2_hf_to_tune",
    "gemma2_tune_to_hf",
]

_ATTN_IMPLS = ("eager", "flex", "sdpa")


class SoftcappedTiedLinear(TiedLinear):
    r"""Tied output projection followed by the final logit soft-cap, :math:`c \tanh(Wh / c)`.

    A subclass of ``TiedLinear`` so torchtune code that special-cases tied outputs keeps working.

    Args:
        tied_module (nn.Module): the token embedding whose weight is the projection.
        capping_value (float | None): ``c``; ``None`` disables the cap.
    """

    def __init__(self, tied_module: nn.Module, capping_value: float | None):
        super().__init__(tied_module)
        self.capping_value = capping_value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V] capped logits."""
        logits = super().__call__(x)
        if self.capping_value is None:
            return logits
        return torch.tanh(logits / self.capping_value) * self.capping_value


class Gemma2Attention(nn.Module):
    """Gemma-2 grouped-query attention with logit soft-capping and an optional sliding window.

    Attribute names follow torchtune's ``MultiHeadAttention`` (``q_proj``, ..., ``num_heads``,
    ``head_dim``) so checkpoints, LoRA-free recipes and :mod:`tad_torchtune.models.student_init` see
    the same layout.

    Args:
        embed_dim (int): model width ``D``.
        num_heads (int): query heads ``H``.
        num_kv_heads (int): key/value heads (``H % num_kv_heads == 0``).
        head_dim (int): per-head width (256 for Gemma-2; need not be ``D / H``).
        pos_embeddings (nn.Module): RoPE over ``[B, S, H, head_dim]`` (interleaved torchtune layout).
        max_seq_len (int): maximum sequence length (KV-cache size default).
        softcapping (float | None): attention logit cap (HF ``attn_logit_softcapping``, 50.0).
        sliding_window (int | None): window ``W`` (token ``i`` sees ``j`` iff ``0 <= i - j < W``), or None.
        query_pre_attn_scalar (float | None): scores are scaled by ``query_pre_attn_scalar ** -0.5``
            (HF default 256); None means ``head_dim``.
        attn_impl (str): ``"eager"`` (exact, query-blocked), ``"flex"`` (exact, flex attention; on CPU with
            autograd it falls back to eager, flex having no CPU backward) or ``"sdpa"`` (no soft-cap).
            Default: "eager"
        q_block_size (int): query block size of the eager path. Default: 512
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        pos_embeddings: nn.Module,
        max_seq_len: int,
        softcapping: float | None = 50.0,
        sliding_window: int | None = None,
        query_pre_attn_scalar: float | None = None,
        attn_impl: str = "eager",
        q_block_size: int = 512,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if attn_impl not in _ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}; use one of {_ATTN_IMPLS}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.max_seq_len = max_seq_len
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False)
        self.pos_embeddings = pos_embeddings
        self.softcapping = softcapping
        self.sliding_window = sliding_window
        self.scaling = (query_pre_attn_scalar or head_dim) ** -0.5
        self.attn_impl = attn_impl
        self.q_block_size = q_block_size
        self.kv_cache: KVCache | None = None
        self.cache_enabled = False

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """Allocate a KV cache of ``[B, num_kv_heads, max_seq_len, head_dim]`` (for generation)."""
        if self.kv_cache is None:
            self.kv_cache = KVCache(
                batch_size=batch_size,
                max_seq_len=max_seq_len,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                dtype=dtype,
            )
            self.cache_enabled = True

    def reset_cache(self) -> None:
        if self.kv_cache is None:
            raise RuntimeError("Key value caches are not set up; call setup_caches() first.")
        self.kv_cache.reset()

    def _allowed(self, mask, s_q: int, s_k: int, input_pos, cached: bool, device) -> torch.Tensor:
        """Boolean ``[B or 1, 1, s_q, s_k]``: True where query i may attend key j.

        The sliding window compares *sequence indices* (cache slots when decoding with a KV cache), not
        ``input_pos``: in a packed training batch ``input_pos`` restarts at every document while the key
        index does not, and the block-causal ``mask`` already keeps documents apart.
        """
        if cached and input_pos is not None:
            q_idx = input_pos.view(-1, s_q)
        else:
            q_idx = torch.arange(s_q, device=device).view(1, s_q)
        k_idx = torch.arange(s_k, device=device)
        if mask is None:
            allowed = k_idx.view(1, 1, s_k) <= q_idx.unsqueeze(-1)  # causal
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise NotImplementedError("Gemma2Attention takes a boolean [B, S, S] mask (packed=True is fine).")
            allowed = mask
        if self.sliding_window is not None:
            allowed = allowed & (q_idx.unsqueeze(-1) - k_idx.view(1, 1, s_k) < self.sliding_window)
        return allowed.unsqueeze(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask=None, input_pos=None) -> torch.Tensor:
        """Self-attention over ``x`` ``[B, S, D]`` -> ``[B, S, D]`` (``y`` must be ``x`` or None with a cache)."""
        b, s, _ = x.shape
        y = x if y is None else y
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(y).view(b, y.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(y).view(b, y.shape[1], self.num_kv_heads, self.head_dim)
        q = self.pos_embeddings(q, input_pos=input_pos).transpose(1, 2)  # [B, H, S, hd]
        k = self.pos_embeddings(k, input_pos=input_pos).transpose(1, 2)  # [B, KV, S, hd]
        v = v.transpose(1, 2)
        cached = self.kv_cache is not None and self.cache_enabled
        if cached:
            k, v = self.kv_cache.update(k, v)
        allowed = self._allowed(mask, s, k.shape[2], input_pos, cached, x.device)
        # flex_attention has no CPU backward: a CPU run that needs gradients takes the (exact) eager path
        if self.attn_impl == "flex" and (q.is_cuda or not torch.is_grad_enabled()):
            out = self._flex(q, k, v, allowed)
        else:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S_k, hd]
            if self.attn_impl == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scaling)
            else:
                out = self._eager(q, k, v, allowed)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _eager(self, q, k, v, allowed) -> torch.Tensor:
        """Exact soft-capped attention, one block of queries at a time ([B, H, blk, S_k] scores)."""
        outs = []
        neg = torch.finfo(torch.float32).min
        for i in range(0, q.shape[2], self.q_block_size):
            scores = torch.matmul(q[:, :, i : i + self.q_block_size], k.transpose(2, 3)) * self.scaling
            if self.softcapping is not None:
                scores = torch.tanh(scores / self.softcapping) * self.softcapping
            scores = scores.float().masked_fill(~allowed[:, :, i : i + self.q_block_size], neg)
            outs.append(torch.matmul(F.softmax(scores, dim=-1).type_as(q), v))
        return torch.cat(outs, dim=2)

    def _flex(self, q, k, v, allowed) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        cap = self.softcapping
        bsz = allowed.shape[0]
        allowed3 = allowed[:, 0]

        def score_mod(score, b, h, qi, ki):
            return score if cap is None else torch.tanh(score / cap) * cap

        def mask_mod(b, h, qi, ki):
            return allowed3[b if bsz > 1 else 0, qi, ki]

        block_mask = create_block_mask(
            mask_mod, B=bsz if bsz > 1 else None, H=None, Q_LEN=q.shape[2], KV_LEN=k.shape[2], device=q.device
        )
        fn = _compiled_flex() if q.is_cuda else flex_attention  # eager flex (CPU) materialises the scores
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=self.scaling, enable_gqa=True)


_FLEX_COMPILED = None


def _compiled_flex():
    """``torch.compile(flex_attention)``, built once per process (compiling per call would retrace)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def gemma2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_eps: float = 1e-6,
    rope_base: float = 10_000.0,
    attn_logit_softcapping: float | None = 50.0,
    final_logit_softcapping: float | None = 30.0,
    sliding_window: int | None = 4096,
    query_pre_attn_scalar: float | None = None,
    attn_impl: str = "eager",
    q_block_size: int = 512,
) -> TransformerDecoder:
    """Gemma-2 decoder matching HF ``Gemma2ForCausalLM`` (tied embeddings, sandwich norms, both caps).

    Args:
        vocab_size (int): vocabulary size (256000 for Gemma-2).
        num_layers (int): decoder layers.
        num_heads (int): query heads.
        head_dim (int): per-head width.
        num_kv_heads (int): key/value heads.
        embed_dim (int): model width.
        intermediate_dim (int): GeGLU hidden width.
        max_seq_len (int): maximum sequence length (RoPE cache).
        norm_eps (float): RMSNorm epsilon. Default: 1e-6
        rope_base (float): RoPE theta. Default: 10000.0
        attn_logit_softcapping (float | None): attention score cap (HF 50.0). Default: 50.0
        final_logit_softcapping (float | None): output logit cap (HF 30.0). Default: 30.0
        sliding_window (int | None): window of the even-indexed layers. Default: 4096
        query_pre_attn_scalar (float | None): attention scale is its ``-0.5`` power; None = head_dim.
        attn_impl (str): "eager" | "flex" | "sdpa" (see :class:`Gemma2Attention`). Default: "eager"
        q_block_size (int): eager query block. Default: 512

    Returns:
        TransformerDecoder: the model; ``model(tokens)`` gives capped logits ``[B, S, V]``.
    """
    rope = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for i in range(num_layers):
        attn = Gemma2Attention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            softcapping=attn_logit_softcapping,
            sliding_window=sliding_window if i % 2 == 0 else None,
            query_pre_attn_scalar=query_pre_attn_scalar,
            attn_impl=attn_impl,
            q_block_size=q_block_size,
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=gemma_mlp(dim=embed_dim, hidden_dim=intermediate_dim),
                sa_norm=GemmaRMSNorm(embed_dim, eps=norm_eps),  # HF input_layernorm
                sa_scale=GemmaRMSNorm(embed_dim, eps=norm_eps),  # HF post_attention_layernorm
                mlp_norm=GemmaRMSNorm(embed_dim, eps=norm_eps),  # HF pre_feedforward_layernorm
                mlp_scale=GemmaRMSNorm(embed_dim, eps=norm_eps),  # HF post_feedforward_layernorm
            )
        )
    tok_embeddings = GemmaNormEmbeddings(vocab_size, embed_dim)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=GemmaRMSNorm(embed_dim, eps=norm_eps),
        output=SoftcappedTiedLinear(tok_embeddings, final_logit_softcapping),
    )


_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.sa_scale.scale",
    # torchtune 0.6.1 has these two swapped (#2850)
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
    "model.norm.weight": "norm.scale",
}


def _permute(t: torch.Tensor, n_heads: int, head_dim: int, inverse: bool) -> torch.Tensor:
    """HF rotate-half row order <-> torchtune interleaved RoPE row order, per head."""
    dim = t.shape[1]
    if inverse:  # tune -> HF
        return t.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)
    return t.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def gemma2_hf_to_tune(
    state_dict: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int, dim: int, head_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """HF ``Gemma2ForCausalLM`` state dict -> our :func:`gemma2` state dict (``lm_head`` is tied, dropped)."""
    head_dim = head_dim or dim // num_heads
    out = {}
    for key, value in state_dict.items():
        if "rotary_emb.inv_freq" in key or key == "lm_head.weight":
            continue
        new_key = get_mapped_key(key, _FROM_HF)
        if "q_proj" in key:
            value = _permute(value, num_heads, head_dim, inverse=False)
        elif "k_proj" in key:
            value = _permute(value, num_kv_heads, head_dim, inverse=False)
        out[new_key] = value
    return out


def gemma2_tune_to_hf(
    state_dict: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int, dim: int, head_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`gemma2_hf_to_tune` (HF ties ``lm_head`` to the embedding, so it is not written)."""
    head_dim = head_dim or dim // num_heads
    inverse = {v: k for k, v in _FROM_HF.items()}
    out = {}
    for key, value in state_dict.items():
        new_key = get_mapped_key(key, inverse)
        if "q_proj" in key:
            value = _permute(value, num_heads, head_dim, inverse=True)
        elif "k_proj" in key:
            value = _permute(value, num_kv_heads, head_dim, inverse=True)
        out[new_key] = value
    return out
