"""Tiny torchtune models shared by the eval tests (built in the test, nothing downloaded)."""

from __future__ import annotations

import torch
from torchtune.models.llama3._component_builders import llama3


def tiny_llama(vocab_size: int = 64, num_layers: int = 1, embed_dim: int = 16, seed: int = 0, max_seq_len: int = 128):
    """A random llama3-style decoder; the output projection is scaled up so the distribution is peaked."""
    torch.manual_seed(seed)
    model = llama3(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=2,
        num_kv_heads=1,
        embed_dim=embed_dim,
        intermediate_dim=32,
        max_seq_len=max_seq_len,
    )
    with torch.no_grad():
        model.output.weight.mul_(8.0)  # random init is near-uniform; make the tails and KL non-trivial
    return model.eval()


def random_batches(vocab_size: int, n: int = 2, b: int = 2, s: int = 12, ignore_frac: float = 0.25):
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab_size, (b, s))
        labels = torch.randint(0, vocab_size, (b, s))
        labels[torch.rand(b, s) < ignore_frac] = -100
        out.append({"tokens": tokens, "labels": labels})
    return out
