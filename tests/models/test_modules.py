"""Phi-2 / Gemma-2 modules inside torchtune: attention paths agree, KV-cache decoding, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.training import set_activation_checkpointing

from tad_torchtune.models.gemma2 import gemma2
from tad_torchtune.models.phi2 import PartialRotaryPositionalEmbeddings, phi2


def _gemma(**kw):
    return gemma2(96, 2, 4, 16, 2, 32, 48, 64, sliding_window=5, attn_logit_softcapping=3.0, **kw)


def test_gemma2_eager_block_sizes_and_flex_agree():
    ref = _gemma(q_block_size=1024).eval()
    tokens = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        want = ref(tokens)
        for impl, blk in (("eager", 4), ("eager", 1), ("flex", 512)):
            m = _gemma(attn_impl=impl, q_block_size=blk).eval()
            m.load_state_dict(ref.state_dict())
            torch.testing.assert_close(m(tokens), want, rtol=0, atol=1e-5)
        # sdpa drops the attention soft-cap: it must differ when the cap is active
        m = _gemma(attn_impl="sdpa").eval()
        m.load_state_dict(ref.state_dict())
        assert (m(tokens) - want).abs().max() > 1e-3
    with pytest.raises(ValueError, match="attn_impl"):
        _gemma(attn_impl="flash")


def test_packed_mask_blocks_attention_across_documents():
    """A block-causal [B, S, S] mask (torchtune packing) equals running the documents separately."""
    m = _gemma().eval()
    a, b = torch.randint(0, 96, (1, 6)), torch.randint(0, 96, (1, 7))
    tokens = torch.cat([a, b], dim=1)
    mask = torch.zeros(1, 13, 13, dtype=torch.bool)
    mask[0, :6, :6] = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    mask[0, 6:, 6:] = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    pos = torch.cat([torch.arange(6), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = m(tokens, mask=mask, input_pos=pos)
        torch.testing.assert_close(packed[:, :6], m(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 6:], m(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "phi2"])
def test_kv_cache_decoding_matches_full_forward(name):
    model = (_gemma() if name == "gemma2" else phi2(96, 2, 4, 40, 64, 64)).eval()
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=16)
        causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))
        steps = [model(tokens[:, :5], mask=causal[None, :5], input_pos=torch.arange(5)[None])]
        for i in range(5, 9):
            steps.append(model(tokens[:, i : i + 1], mask=causal[None, i : i + 1], input_pos=torch.tensor([[i]])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_phi2_activation_checkpointing_same_grads():
    """PhiParallelLayer is a TransformerSelfAttentionLayer, so torchtune's AC policy wraps it."""
    a = phi2(96, 2, 4, 40, 64, 64)
    b = phi2(96, 2, 4, 40, 64, 64)
    b.load_state_dict(a.state_dict())
    set_activation_checkpointing(b, auto_wrap_policy={TransformerSelfAttentionLayer})
    assert "checkpoint" in type(b.layers[0]).__name__.lower() or any("checkpoint" in n for n, _ in b.named_modules())
    tokens = torch.randint(0, 96, (2, 10))
    a(tokens).logsumexp(-1).sum().backward()
    b(tokens).logsumexp(-1).sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_partial_rotary_leaves_pass_dims():
    rope = PartialRotaryPositionalEmbeddings(head_dim=10, rotary_dim=4, max_seq_len=8)
    x = torch.randn(1, 8, 2, 10)
    y = rope(x)
    assert torch.equal(y[..., 4:], x[..., 4:]) and not torch.allclose(y[..., :4], x[..., :4])
    with pytest.raises(ValueError, match="rotary_dim"):
        PartialRotaryPositionalEmbeddings(head_dim=10, rotary_dim=3, max_seq_len=8)


def test_gemma2_flex_trains_on_cpu_via_eager_fallback():
    """flex_attention has no CPU backward; attn_impl='flex' must still train on CPU (same grads as eager)."""
    a, b = _gemma(), _gemma(attn_impl="flex")
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 96, (2, 9))
    a(tokens).sum().backward()
    b(tokens).sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
