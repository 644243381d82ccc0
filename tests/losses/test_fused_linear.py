"""The fused linear losses equal the reference on materialised logits, and never build ``[B, S, V]``."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tad_torchtune.losses import ForwardKLLoss, TADLoss
from tad_torchtune.losses.fused_linear import (
    FusedLinearDistillationLoss,
    FusedLinearForwardKLLoss,
    FusedLinearTADLoss,
    final_hidden_states,
    fused_distillation_loss,
    output_projection,
)
from tad_torchtune.losses.reference import forward_kl_reference, tad_reference

B, S, D_S, D_T, V, V_T = 2, 11, 8, 12, 40, 45


def _inputs(dtype=torch.float64, bias=True, ignored=True):
    hs = torch.randn(B, S, D_S, dtype=dtype)
    ws = torch.randn(V, D_S, dtype=dtype) * 0.7
    bs = torch.randn(V, dtype=dtype) if bias else None
    ht = torch.randn(B, S, D_T, dtype=dtype)
    wt = torch.randn(V_T, D_T, dtype=dtype)
    labels = torch.randint(0, V, (B, S))
    if ignored:
        labels[0, :4] = -100
        labels[1, -2:] = -100
    return hs, ws, bs, ht, wt, labels


def _ref_grads(ref_fn, hs, ws, bs, ht, wt, labels):
    """Reference loss and gradients: materialise the logits in fp64, autograd through the definitions."""
    leaves = [t.detach().double().requires_grad_(True) for t in (hs, ws) + ((bs,) if bs is not None else ())]
    zs = F.linear(leaves[0], leaves[1], leaves[2] if bs is not None else None)
    zt = F.linear(ht.double(), wt.double())
    loss = ref_fn(zs, zt, labels)
    return loss, torch.autograd.grad(loss, leaves)


def _fused_grads(fused, hs, ws, bs, ht, wt, labels, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hs, ws) + ((bs,) if bs is not None else ())]
    loss = fused(leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2] if bs is not None else None, **kw)
    return loss, torch.autograd.grad(loss, leaves)


# chunk_size 1 and 7 cut the 11-position rows (two teacher passes); 12 holds one whole row per slice and
# 1000 the whole batch (one pass, w(X) from the slice itself).
@pytest.mark.parametrize("chunk_size", [1, 7, 12, 1000])
@pytest.mark.parametrize("normalize_beta", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tad_matches_reference_fp32(chunk_size, normalize_beta, temperature):
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    fused = FusedLinearTADLoss(top_k=5, beta=2.0, temperature=temperature, normalize_beta=normalize_beta,
                               chunk_size=chunk_size)  # fmt: skip
    loss, grads = _fused_grads(fused, hs, ws, bs, ht, wt, labels)

    def ref_fn(zs, zt, lab):
        return tad_reference(zs, zt, lab, top_k=5, beta=2.0, temperature=temperature, normalize_beta=normalize_beta)

    ref, ref_grads = _ref_grads(ref_fn, hs, ws, bs, ht, wt, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_tad_matches_reference_bf16():
    """bf16 hidden states and weights: logits formed in bf16 like the model's output layer, math in fp32."""
    hs, ws, bs, ht, wt, labels = _inputs(torch.bfloat16)
    fused = FusedLinearTADLoss(top_k=5, chunk_size=8)
    loss, grads = _fused_grads(fused, hs, ws, bs, ht, wt, labels)
    # Reference on the *same* bf16 logits, gradient by fp64 autograd through them, then the bf16 chain rule.
    zs = F.linear(hs, ws, bs).double().requires_grad_(True)
    zt = F.linear(ht, wt).double()
    ref = tad_reference(zs, zt, labels, top_k=5)
    (g_logits,) = torch.autograd.grad(ref, zs)
    g = g_logits.reshape(-1, V)
    want = [(g @ ws.double()).view(B, S, D_S), g.t() @ hs.double().reshape(-1, D_S), g.sum(0)]
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, w in zip(grads, want, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), w, rtol=2e-2, atol=2e-3)


def test_equals_materialised_tad_loss_and_stats():
    """Same per-chunk code as TADLoss on materialised logits: identical loss, gradient and statistics."""
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    fused = FusedLinearTADLoss(top_k=3, chunk_size=6)
    loss = fused(hs, ws, ht, wt, labels, student_bias=bs, normalize=False)
    dense = TADLoss(top_k=3)
    zs = F.linear(hs, ws, bs)
    want = dense(zs, F.linear(ht, wt), labels, normalize=False)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    got_stats, want_stats = fused.stats(), dense.stats()
    assert got_stats.keys() == want_stats.keys()
    for key in want_stats:
        assert got_stats[key] == pytest.approx(want_stats[key], rel=1e-5, abs=1e-6), key


def test_forward_kl_matches_reference():
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    loss, grads = _fused_grads(FusedLinearForwardKLLoss(temperature=1.5, chunk_size=5), hs, ws, bs, ht, wt, labels)
    ref, ref_grads = _ref_grads(
        lambda zs, zt, lab: forward_kl_reference(zs, zt, lab, temperature=1.5), hs, ws, bs, ht, wt, labels
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_cross_entropy_and_weights():
    """kd_weight · TAD + ce_weight · CE, with CE at temperature 1 on the unscaled logits."""
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    fused = FusedLinearTADLoss(top_k=4, temperature=2.0, chunk_size=9)
    loss, grads = _fused_grads(fused, hs, ws, bs, ht, wt, labels, kd_weight=0.3, ce_weight=0.7)

    def ref_fn(zs, zt, lab):
        ce = F.cross_entropy(zs.reshape(-1, V), lab.reshape(-1), ignore_index=-100)
        return 0.3 * tad_reference(zs, zt, lab, top_k=4, temperature=2.0) + 0.7 * ce

    ref, ref_grads = _ref_grads(ref_fn, hs, ws, bs, ht, wt, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    ce_ref = F.cross_entropy(F.linear(hs, ws, bs).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert fused.stats()["ce_mean"] == pytest.approx(ce_ref.item(), rel=1e-5)


@pytest.mark.parametrize("loss_name", ["tad", "fkl"])
@pytest.mark.parametrize("chunk_size", [5, 12, 1000])
def test_cross_entropy_folded_into_the_divergence_at_temperature_one(loss_name, chunk_size):
    """At τ = 1 TAD and forward KL add CE to their own value and gradient (no separate CE pass): same numbers
    as kd_weight · divergence + ce_weight · CE on the reference, including the one-hot at ignored rows."""
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    if loss_name == "tad":
        fused = FusedLinearTADLoss(top_k=4, chunk_size=chunk_size)

        def div_ref(zs, zt, lab):
            return tad_reference(zs, zt, lab, top_k=4)
    else:
        fused = FusedLinearForwardKLLoss(chunk_size=chunk_size)
        div_ref = forward_kl_reference
    assert fused.divergence.folds_ce
    loss, grads = _fused_grads(fused, hs, ws, bs, ht, wt, labels, kd_weight=0.3, ce_weight=0.7)

    def ref_fn(zs, zt, lab):
        ce = F.cross_entropy(zs.reshape(-1, V), lab.reshape(-1), ignore_index=-100)
        return 0.3 * div_ref(zs, zt, lab) + 0.7 * ce

    ref, ref_grads = _ref_grads(ref_fn, hs, ws, bs, ht, wt, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    ce_ref = F.cross_entropy(F.linear(hs, ws, bs).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert fused.stats()["ce_mean"] == pytest.approx(ce_ref.item(), rel=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_cross_entropy_folded_on_log_space_tail_rows(compiled):
    """A student so sure of the teacher's top-K that its tail mass α_S underflows fp32 (the log-space rows of
    TADLoss): those rows also carry the folded CE gradient. Compiled, the rows are selected without a branch."""
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    top = torch.tensor([0, 1, 2])
    bs = torch.zeros(V).index_fill_(0, top, 200.0)  # tail mass ~e^-200: 0 in fp32, finite in fp64
    bt = torch.zeros(V_T).index_fill_(0, top, 12.0)  # the teacher's top-3 are the same ids, α_T > 0
    if compiled:
        torch._dynamo.reset()
    fused = FusedLinearTADLoss(top_k=3, chunk_size=1000, compile_chunk=compiled, compile_backend="aot_eager")
    loss, grads = _fused_grads(fused, hs, ws, bs, ht, wt, labels, teacher_bias=bt, ce_weight=1.0)
    assert fused.stats()["alpha_s_mean"] > 0  # from the shifted tail sum, not a plain fp32 sum (which is 0)

    leaves = [t.double().requires_grad_(True) for t in (hs, ws, bs)]
    zs = F.linear(*leaves)
    zt = F.linear(ht.double(), wt.double(), bt.double())
    ref = tad_reference(zs, zt, labels, top_k=3) + F.cross_entropy(zs.reshape(-1, V), labels.reshape(-1))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_one_pass_and_two_pass_slicing_agree():
    """Whole-row slices (one teacher projection, w(X) from the slice) and sequence slices (a first pass over
    all slices for w(X)) are two schedules of the same sums: same loss, gradients and statistics."""
    b, s = 3, 16
    hs = torch.randn(b, s, D_S)
    ws, ht, wt = torch.randn(V, D_S), torch.randn(b, s, D_T), torch.randn(V_T, D_T)
    labels = torch.randint(0, V, (b, s))
    labels[1, 3:9] = -100
    labels[2] = -100  # a row with no valid position has no w(X)
    results = {}
    for chunk in (16, 40, 10):  # whole rows, one per slice / both valid rows in one slice / rows cut every 10
        fused = FusedLinearTADLoss(top_k=4, chunk_size=chunk)
        loss, grads = _fused_grads(fused, hs, ws, None, ht, wt, labels, ce_weight=1.0)
        results[chunk] = (loss, grads, fused.stats())
    loss, grads, stats = results[10]
    for chunk in (16, 40):
        torch.testing.assert_close(results[chunk][0], loss, rtol=1e-6, atol=1e-6)
        for got, want in zip(results[chunk][1], grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert results[chunk][2] == pytest.approx(stats, rel=1e-5, abs=1e-6)
    assert stats["w_mean"] > 0 and stats["num_tokens"] == (labels != -100).sum().item()


class _ProjectedRows(TorchDispatchMode):
    """Rows of every matmul against a given ``[D, V]`` (transposed output weight) operand."""

    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.shape, self.rows = (d, vocab), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = (args[0], args[1]) if func.overloadpacket is torch.ops.aten.mm else (args[1], args[2])
            if tuple(b.shape) == self.shape:
                self.rows.append(a.size(0))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk_size", [6, 1000])
def test_ignored_positions_are_never_projected(chunk_size):
    """An SFT batch's prompt and padding (label -100) cost no projection: the teacher is projected once per
    valid position with whole-row slices (chunk 1000) and twice with rows cut across slices (chunk 6)."""
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    labels[1, :7] = -100
    num_valid = int((labels != -100).sum())
    with _ProjectedRows(D_T, V) as teacher_mm:
        loss, grads = _fused_grads(FusedLinearTADLoss(top_k=4, chunk_size=chunk_size), hs, ws, bs, ht, wt, labels)
    assert sum(teacher_mm.rows) == num_valid * (1 if chunk_size == 1000 else 2)
    assert max(teacher_mm.rows) <= chunk_size
    ref, ref_grads = _ref_grads(lambda zs, zt, lab: tad_reference(zs, zt, lab, top_k=4), hs, ws, bs, ht, wt, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[0][labels == -100], torch.zeros_like(grads[0][labels == -100]))
    torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_workspace_kept_between_calls_is_exact(dtype):
    """Kept scratch buffers (the CPU default) give bit-identical results to fresh ones, across calls of
    different shapes, and ``release_workspace`` drops them."""
    kept, fresh = FusedLinearTADLoss(top_k=4, chunk_size=12), FusedLinearTADLoss(top_k=4, chunk_size=12)
    fresh.divergence.keep_workspace = False
    _, ws, bs, _, wt, _ = _inputs(dtype)
    for b in (2, 1, 3):
        hs, ht = torch.randn(b, S, D_S, dtype=dtype), torch.randn(b, S, D_T, dtype=dtype)
        labels = torch.randint(0, V, (b, S))
        labels[0, :3] = -100
        got = _fused_grads(kept, hs, ws, bs, ht, wt, labels, ce_weight=1.0)
        want = _fused_grads(fresh, hs, ws, bs, ht, wt, labels, ce_weight=1.0)
        assert torch.equal(got[0], want[0])
        for g, w in zip(got[1], want[1], strict=True):
            assert torch.equal(g, w)
    assert kept.divergence._kept_workspace and fresh.divergence._kept_workspace is None
    kept.divergence.release_workspace()
    assert kept.divergence._kept_workspace is None


def test_teacher_never_gets_a_gradient_and_no_valid_tokens():
    hs, ws, _, ht, wt, labels = _inputs(torch.float32, bias=False)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    FusedLinearTADLoss(top_k=3)(hs, ws, ht, wt, labels).backward()
    assert ht.grad is None and wt.grad is None
    assert hs.grad is not None and ws.grad is not None
    # No valid position: loss 0, finite (zero) gradients.
    loss = FusedLinearTADLoss(top_k=3)(hs, ws, ht.detach(), wt.detach(), torch.full_like(labels, -100))
    (g,) = torch.autograd.grad(loss, [ws])
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits():
    """No tensor created in forward or backward is larger than one chunk of logits or the weight gradient."""
    b, s, d, vocab, chunk = 4, 64, 16, 300, 32
    hs = torch.randn(b, s, d, requires_grad=True)
    ws = torch.randn(vocab, d, requires_grad=True)
    ht, wt = torch.randn(b, s, d), torch.randn(vocab + 20, d)
    labels = torch.randint(0, vocab, (b, s))
    with _LargestTensor() as mode:
        FusedLinearTADLoss(top_k=5, chunk_size=chunk)(hs, ws, ht, wt, labels).backward()
    assert mode.largest <= max(chunk * (vocab + 20), vocab * d, b * s * d)
    assert mode.largest < b * s * vocab // 4


def test_errors_name_the_value():
    hs, ws, _, ht, wt, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"teacher vocabulary \(30\) is smaller than the student's \(40\)"):
        FusedLinearTADLoss()(hs, ws, ht, wt[:30], labels)
    with pytest.raises(ValueError, match="chunk_size must be"):
        FusedLinearTADLoss(chunk_size=0)
    with pytest.raises(ValueError, match="student_weight must be"):
        FusedLinearTADLoss()(hs, ws[:, :3], ht, wt, labels)
    with pytest.raises(ValueError, match="top_k=40 must be smaller"):
        FusedLinearTADLoss(top_k=40)(hs, ws, ht, wt, labels)
    with pytest.raises(ValueError, match="chunk kernel"):
        FusedLinearDistillationLoss(torch.nn.MSELoss())


def _tiny_models(tied: bool):
    from torchtune.models.llama2 import llama2
    from torchtune.models.qwen2 import qwen2

    student = qwen2(vocab_size=V, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=16, intermediate_dim=32,
                    max_seq_len=32, tie_word_embeddings=tied)  # fmt: skip
    teacher = llama2(vocab_size=V_T, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=24, max_seq_len=32)
    return student, teacher


@pytest.mark.parametrize("tied", [True, False])
def test_whole_model_matches_materialised_path(tied):
    """fused_distillation_loss on torchtune decoders == logits + TADLoss + CE, for every student parameter
    (tied embeddings: the embedding weight gets both the input and the output gradient)."""
    student, teacher = _tiny_models(tied)
    tokens = torch.randint(0, V, (2, 10))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    loss_fn = FusedLinearTADLoss(top_k=4, chunk_size=6)
    loss = fused_distillation_loss(student, teacher, tokens, labels, loss_fn, normalize=True, ce_weight=1.0)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    assert not any(p.grad is not None for p in teacher.parameters())

    logits = student(tokens)
    with torch.no_grad():
        t_logits = teacher(tokens)
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    want = TADLoss(top_k=4)(logits, t_logits, labels) + ce
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The helpers: final hidden states are the norm's output, and the weight is the tied embedding.
    h = final_hidden_states(student, tokens)
    torch.testing.assert_close(F.linear(h, output_projection(student)[0]), logits)
    assert (output_projection(student)[0] is student.tok_embeddings.weight) == tied
    assert "unembed" not in student.__dict__ and "unembed" not in student._modules


@pytest.mark.parametrize("chunk_size", [8, 1000])  # rows cut (two passes) / whole rows (one pass)
def test_compiled_chunk_matches_eager(chunk_size):
    # aot_eager: dynamo + AOTAutograd tracing of the per-chunk step in a few seconds; the inductor backend
    # (~30 s of C++ compilation on CPU) is exercised by benchmarks/benchmark_fused.py.
    import torch._dynamo

    torch._dynamo.reset()
    hs, ws, bs, ht, wt, labels = _inputs(torch.float32)
    from torch._dynamo.utils import counters

    eager = FusedLinearTADLoss(top_k=3, chunk_size=chunk_size)
    compiled = FusedLinearTADLoss(top_k=3, chunk_size=chunk_size, compile_chunk=True, compile_backend="aot_eager")
    loss, grads = _fused_grads(eager, hs, ws, bs, ht, wt, labels, ce_weight=1.0)
    counters.clear()
    c_loss, c_grads = _fused_grads(compiled, hs, ws, bs, ht, wt, labels, ce_weight=1.0)
    # One graph per slice step: a graph break (a host sync in the divergence) once silently lost statistics.
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert compiled.stats() == pytest.approx(eager.stats(), rel=1e-5, abs=1e-6)


def test_forward_kl_fused_equals_dense_chunked():
    hs, ws, _, ht, wt, labels = _inputs(torch.float32, bias=False)
    got = FusedLinearForwardKLLoss(chunk_size=4)(hs, ws, ht, wt, labels)
    want = ForwardKLLoss()(F.linear(hs, ws), F.linear(ht, wt), labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _fsdp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One FSDP2 rank: fused loss on its shard of the data; full gradients written by rank 0."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tokens = torch.randint(0, V, (world, 2, 10), generator=torch.Generator().manual_seed(1))
        labels = torch.roll(tokens, -1, -1)
        labels[..., -1] = -100
        worst = {}
        for tied in (True, False):
            torch.manual_seed(0)
            student, teacher = _tiny_models(tied)
            for model in (student, teacher):
                for layer in model.layers:
                    fully_shard(layer)
                fully_shard(model)
            loss_fn = FusedLinearTADLoss(top_k=4, chunk_size=6)
            fused_distillation_loss(
                student, teacher, tokens[rank], labels[rank], loss_fn, normalize=True, ce_weight=1.0
            ).backward()
            got = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
            # Reference: unsharded models, dense logits, mean over the ranks' losses (FSDP2 averages gradients).
            torch.manual_seed(0)
            ref_student, ref_teacher = _tiny_models(tied)
            for r in range(world):
                logits = ref_student(tokens[r])
                with torch.no_grad():
                    t_logits = ref_teacher(tokens[r])
                ce = F.cross_entropy(logits.reshape(-1, V), labels[r].reshape(-1), ignore_index=-100)
                ((TADLoss(top_k=4)(logits, t_logits, labels[r]) + ce) / world).backward()
            worst[tied] = max((got[n] - p.grad).abs().max().item() for n, p in ref_student.named_parameters())
        if rank == 0:
            with open(out_file, "w") as f:
                f.write(repr(worst))
    finally:
        dist.destroy_process_group()


def test_fsdp2_gloo_two_ranks_match_dense(tmp_path):
    """Under FSDP2 (2 gloo ranks), fused_distillation_loss gives the dense path's averaged gradients, tied
    or not: the student's output weight is FSDP's own unsharded parameter inside the root forward, so its
    gradient is reduce-scattered like every other."""
    import torch.multiprocessing as mp

    out = tmp_path / "worst.txt"
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    worst = eval(out.read_text())  # noqa: S307 - our own repr of a dict of floats
    assert worst[True] < 1e-5 and worst[False] < 1e-5, worst


def test_output_projection_refuses_a_soft_capped_tied_head():
    """Gemma-2's SoftcappedTiedLinear subclasses TiedLinear; fusing it would silently drop the logit cap."""
    from torchtune.modules import TiedLinear

    from tad_torchtune.losses.fused_linear import output_projection
    from tad_torchtune.models.gemma2 import SoftcappedTiedLinear

    embedding = nn.Embedding(11, 4)
    model = nn.Module()
    model.output = TiedLinear(embedding)
    weight, bias = output_projection(model)
    assert weight is embedding.weight and bias is None
    model.output = SoftcappedTiedLinear(embedding, capping_value=30.0)
    with pytest.raises(ValueError, match="SoftcappedTiedLinear"):
        output_projection(model)
