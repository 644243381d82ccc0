"""The chunk-kernel protocol (losses/base.py): every shipped divergence satisfies it, the two drivers agree
through it alone, and the fused classes' arguments are their divergence's by construction."""

import inspect

import pytest
import torch

from tad_torchtune.losses import (
    ForwardKLLoss,
    FusedLinearDistillationLoss,
    FusedLinearForwardKLLoss,
    FusedLinearTADLoss,
    JSDLoss,
    ReverseKLLoss,
    SymmetricKLLoss,
    TADLoss,
    ToDiLoss,
)
from tad_torchtune.losses.base import ChunkKernel

KERNELS = [TADLoss(top_k=3), ForwardKLLoss(), ReverseKLLoss(), SymmetricKLLoss(), JSDLoss(), ToDiLoss()]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
def test_every_divergence_is_a_chunk_kernel(kernel):
    assert isinstance(kernel, ChunkKernel)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
def test_fused_driver_equals_materialised_driver_for_every_kernel(kernel):
    """Value, statistics and gradients of one divergence through both drivers (fp64 inputs, tight)."""
    torch.manual_seed(0)
    b, s, d, v = 2, 7, 5, 30
    hs = torch.randn(b, s, d, dtype=torch.float64)
    ws = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(b, s, 6, dtype=torch.float64), torch.randn(v + 4, 6, dtype=torch.float64)
    labels = torch.randint(0, v, (b, s))
    labels[0, :2] = -100
    logits = (hs @ ws.t()).float()
    teacher_logits = (ht @ wt.t()).float()
    materialised = kernel(logits, teacher_logits, labels)
    (grad_ref,) = torch.autograd.grad(materialised, ws)
    stats_ref = kernel.stats()
    fused = FusedLinearDistillationLoss(kernel, chunk_size=5)  # rows cut across slices: two passes for TAD
    hs32, ws32 = hs.float(), ws.detach().float().requires_grad_(True)
    value = fused(hs32, ws32, ht.float(), wt.float(), labels)
    (grad,) = torch.autograd.grad(value, ws32)
    torch.testing.assert_close(value, materialised, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref.float(), rtol=1e-4, atol=1e-6)
    stats = fused.stats()
    assert stats.keys() == stats_ref.keys()
    for key in stats:
        assert stats[key] == pytest.approx(stats_ref[key], rel=1e-5, abs=1e-6), key


def test_summarize_uses_each_statistics_denominator():
    """``w_sum`` is per row, everything else per token; the counts themselves are not averaged."""
    sums = {
        "num_tokens": torch.tensor(8.0),
        "num_rows": torch.tensor(2.0),
        "w_sum": torch.tensor(5.0),
        "dkl1_sum": torch.tensor(4.0),
    }
    assert TADLoss().summarize(sums) == {"num_tokens": 8.0, "w_mean": 2.5, "dkl1_mean": 0.5}
    assert ForwardKLLoss().summarize({}) == {}


@pytest.mark.parametrize(
    ("fused_class", "divergence_class"), [(FusedLinearTADLoss, TADLoss), (FusedLinearForwardKLLoss, ForwardKLLoss)]
)
def test_fused_classes_take_their_divergences_arguments(fused_class, divergence_class):
    """Every argument of the divergence (but num_output_chunks, which the fused path has no use for) is a
    keyword of the fused class with the same default, and reaches the divergence."""
    fused_params = inspect.signature(fused_class).parameters
    for name, param in inspect.signature(divergence_class).parameters.items():
        if name == "num_output_chunks":
            assert name not in fused_params
            continue
        assert fused_params[name].default == param.default, name
    for name in ("chunk_size", "compile_chunk", "accumulate_fp32", "compile_backend", "skip_ignored"):
        assert name in fused_params
    if divergence_class is TADLoss:
        loss = fused_class(top_k=4, beta=3.0, temperature=2.0, chunk_size=16)
        assert (loss.divergence.top_k, loss.divergence.beta, loss.temperature, loss.chunk_size) == (4, 3.0, 2.0, 16)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fused_class(no_such_argument=1)
