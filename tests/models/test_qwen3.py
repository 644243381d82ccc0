"""Qwen3 specifics beyond the HF parity of test_hf_parity.py: why our attention exists, that the parity tests
are sensitive to what they claim to check, and the KV-cache / packed-mask paths of :class:`Qwen3Attention`."""

from __future__ import annotations

import pytest
import torch
from torchtune.modules import MultiHeadAttention

from tad_torchtune.models.qwen3 import Qwen3Attention, qwen3

transformers = pytest.importorskip("transformers")

V, D, L, H, KV, HD, S = 96, 64, 2, 4, 2, 24, 12


def _randomised(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if ("norm" in name or "scale" in name) else 0.2)
    return model.eval()


def _tiny(**kw):
    return _randomised(qwen3(V, L, H, KV, D, 96, 64, head_dim=HD, rope_base=10_000.0, **kw))


def test_norm_before_rope_matters():
    """torchtune 0.6.1's MultiHeadAttention applies q/k norm after RoPE; with non-uniform norm scales that is a
    different function, which is why Qwen3Attention reorders them (HF parity is in test_hf_parity.py)."""
    model = _tiny()
    tokens = torch.randint(0, V, (2, S))
    with torch.no_grad():
        ours = model(tokens)
        for layer in model.layers:  # the parent's forward: norm after RoPE
            layer.attn.forward = MultiHeadAttention.forward.__get__(layer.attn)
        theirs = model(tokens)
    assert (ours - theirs).abs().max() > 1e-2


def test_llama3_rope_scaling_is_checked_by_parity():
    """The Llama-3.x parity cases would fail without the frequency scaling (so they test it)."""
    from torchtune.models.llama3_2 import llama3_2

    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=KV,
        intermediate_size=96,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
    )
    hf = _randomised(transformers.AutoModelForCausalLM.from_config(cfg))
    from torchtune.models.convert_weights import hf_to_tune

    sd = hf_to_tune(hf.state_dict(), num_heads=H, num_kv_heads=KV, dim=D)
    sd.pop("output.weight", None)
    tokens = torch.randint(0, V, (1, 48))
    with torch.no_grad():
        ref = hf(tokens).logits
        errs = {}
        for factor in (32, 1):
            m = llama3_2(V, L, H, KV, D, 64, intermediate_dim=96, rope_base=500_000, scale_factor=factor).eval()
            m.load_state_dict(sd)
            errs[factor] = (m(tokens) - ref).abs().max().item()
    assert errs[32] < 1e-4 < errs[1], errs


def test_kv_cache_decoding_matches_full_forward():
    model = _tiny(tie_word_embeddings=True)
    tokens = torch.randint(0, V, (2, S))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=S)
        prompt = 5
        mask = torch.tril(torch.ones(S, S, dtype=torch.bool)).expand(2, S, S)
        pos = torch.arange(S).expand(2, S)
        step = [model(tokens[:, :prompt], mask=mask[:, :prompt], input_pos=pos[:, :prompt])]
        for i in range(prompt, S):
            step.append(model(tokens[:, i : i + 1], mask=mask[:, i : i + 1], input_pos=pos[:, i : i + 1]))
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=0, atol=1e-5)


def test_packed_mask_keeps_documents_apart():
    """A block-causal mask with restarting positions gives each packed document its unpacked logits."""
    model = _tiny()
    a, b = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 7))
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, :5, :5] = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    mask[0, 5:, 5:] = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), mask=mask, input_pos=pos)
        torch.testing.assert_close(packed[:, :5], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 5:], model(b), rtol=0, atol=1e-5)


def test_layout_and_tying():
    model = qwen3(V, L, H, KV, D, 96, 64, head_dim=HD, tie_word_embeddings=True)
    attn = model.layers[0].attn
    assert isinstance(attn, Qwen3Attention)
    assert attn.q_proj.weight.shape == (H * HD, D) and attn.output_proj.weight.shape == (D, H * HD)
    assert attn.q_proj.bias is None and attn.k_proj.bias is None and attn.v_proj.bias is None
    assert attn.q_norm.scale.shape == (HD,) and attn.k_norm.scale.shape == (HD,)
    assert "output.weight" not in model.state_dict()
    untied = qwen3(V, L, H, KV, D, 96, 64, head_dim=HD)
    assert untied.state_dict()["output.weight"].shape == (V, D)
