"""TAD's maths (docs/spec.md §1-3, paper Eq. 2-6): identities, the closed-form gradient, temperature,
numerically hard teachers and students, per-row weighting, statistics, and a recorded value."""

from __future__ import annotations

import pytest
import torch
from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

from tad_torchtune import ForwardKLLoss, TADLoss
from tad_torchtune.losses.reference import forward_kl_reference, tad_reference


def _random(b=3, s=20, v=50, teacher_scale=3.0, dtype=torch.float32):
    student = torch.randn(b, s, v).to(dtype)
    teacher = (torch.randn(b, s, v) * teacher_scale).to(dtype)
    labels = torch.randint(0, v, (b, s))
    labels[0, :7] = -100
    if b > 2:
        labels[2] = -100  # a row with no valid position
    return student, teacher, labels


def _grad(loss_fn, student, *args, **kwargs):
    x = student.detach().clone().requires_grad_(True)
    loss = loss_fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach().double(), x.grad.double()


def test_identity_kl_equals_dkl1_plus_alpha_dkl2():
    student, teacher, labels = _random()
    _, terms = tad_reference(student, teacher, labels, top_k=5, return_terms=True)
    # The fp64 reference computes KL directly and D_KL1, D_KL2 from their definitions (paper Eq. 2).
    torch.testing.assert_close(terms["kl"], terms["dkl1"] + terms["alpha_t"] * terms["dkl2"], rtol=1e-12, atol=1e-12)
    loss_fn = TADLoss(top_k=5)
    loss_fn(student, teacher, labels)
    st = loss_fn.stats()
    assert st["kl_mean"] == pytest.approx(st["dkl1_mean"] + st["tail_mean"], rel=1e-5)
    # The loss is D_KL1 + w·α_T·D_KL2, per token, with w per row.
    assert st["divergence_mean"] == pytest.approx(st["dkl1_mean"] + st["weighted_tail_mean"], rel=1e-5)


def test_unnormalised_beta_one_is_exact_kl():
    student, teacher, labels = _random()
    tad = _grad(TADLoss(top_k=5, beta=1.0, normalize_beta=False), student, teacher, labels)
    fkl = _grad(ForwardKLLoss(), student, teacher, labels)
    ref = _grad(forward_kl_reference, student.double(), teacher.double(), labels)
    for loss, grad in (tad, fkl):
        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref[1], rtol=1e-4, atol=1e-8)
    # The normalised form with β = 1 is not KL: w(X) = 1 / mean α_T > 1 up-weights the tail.
    normalised = TADLoss(top_k=5, beta=1.0)(student, teacher, labels)
    assert normalised > tad[0] + 1e-3


def test_forward_kl_is_torchtune_cross_entropy_minus_teacher_entropy():
    """torchtune's 'ForwardKL' is H(p_T, p_S); ours is the true KL: same gradient, values differ by H(p_T)."""
    student, teacher, labels = _random()
    chunks = [5, 5, 5, 5]  # torchtune re-chunks the labels evenly itself
    valid = labels != -100
    ours = _grad(lambda x: ForwardKLLoss()(list(x.split(chunks, 1)), list(teacher.split(chunks, 1)), labels), student)
    tt_loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=4)
    theirs = _grad(lambda x: tt_loss(list(x.split(chunks, 1)), list(teacher.split(chunks, 1)), labels), student)
    log_pt = teacher.double().log_softmax(-1)
    entropy = -(log_pt.exp() * log_pt).sum(-1)[valid].mean()
    torch.testing.assert_close(theirs[0], ours[0] + entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs[1], ours[1], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("normalize_beta", [True, False])
def test_gradient_is_paper_eq6_closed_form(tau, normalize_beta):
    """Autograd of the fp64 reference, and our closed-form gradient, equal Eq. 6 written out by hand:
    top-K: p_S − p_T;  tail: p_S − p_T + (w − 1)(p_S·α_T/α_S − p_T)  (per unit of z/τ; ×τ per logit)."""
    torch.manual_seed(3)
    s, v, k, beta = 12, 40, 4, 2.0
    student, teacher = torch.randn(1, s, v, dtype=torch.float64), torch.randn(1, s, v, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (1, s))
    labels[0, 3] = -100
    valid = labels[0] != -100
    ps, pt = (student[0] / tau).softmax(-1), (teacher[0] / tau).softmax(-1)
    top = torch.zeros_like(pt, dtype=torch.bool).scatter(-1, pt.topk(k, -1).indices, True)
    alpha_t, alpha_s = (pt * ~top).sum(-1, keepdim=True), (ps * ~top).sum(-1, keepdim=True)
    w = beta / alpha_t[valid].mean() if normalize_beta else beta
    by_hand = torch.where(top, ps - pt, ps - pt + (w - 1.0) * (ps * alpha_t / alpha_s - pt))
    by_hand = tau * by_hand * valid[:, None]

    _, autograd = _grad(
        lambda x: tad_reference(x, teacher, labels, top_k=k, beta=beta, temperature=tau,
                                normalize_beta=normalize_beta, normalize=False),
        student,
    )  # fmt: skip
    torch.testing.assert_close(autograd[0], by_hand, rtol=1e-10, atol=1e-12)
    ours = TADLoss(top_k=k, beta=beta, temperature=tau, normalize_beta=normalize_beta)
    _, grad = _grad(lambda x: ours(x, teacher.float(), labels, normalize=False), student.float())
    torch.testing.assert_close(grad[0], by_hand, rtol=1e-4, atol=1e-7)


def test_temperature_scaling():
    """τ divides both logits before everything (α included) and the value carries τ² (docs/spec.md §3.4):
    L_τ(s, t) = τ²·L_1(s/τ, t/τ) and ∇_s L_τ(s, t) = τ·(∇L_1)(s/τ, t/τ)."""
    student, teacher, labels = _random()
    tau = 2.0
    loss_tau, grad_tau = _grad(TADLoss(top_k=5, temperature=tau), student, teacher, labels)
    loss_one, grad_one = _grad(TADLoss(top_k=5), student / tau, teacher / tau, labels)
    torch.testing.assert_close(loss_tau, tau**2 * loss_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_tau, tau * grad_one, rtol=1e-5, atol=1e-8)
    ref_loss, ref_grad = _grad(
        lambda x: tad_reference(x, teacher.double(), labels, top_k=5, temperature=tau), student.double()
    )
    torch.testing.assert_close(loss_tau, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_tau, ref_grad, rtol=1e-4, atol=1e-8)
    # α_T is taken at temperature τ: a hotter teacher has more tail mass.
    hot, cold = TADLoss(top_k=5, temperature=tau), TADLoss(top_k=5)
    hot(student, teacher, labels), cold(student, teacher, labels)
    _, terms = tad_reference(student, teacher, labels, top_k=5, temperature=tau, return_terms=True)
    valid = labels != -100
    assert hot.stats()["alpha_t_mean"] == pytest.approx(float(terms["alpha_t"][valid].mean()), rel=1e-5)
    assert hot.stats()["alpha_t_mean"] > cold.stats()["alpha_t_mean"]


def test_w_never_crosses_rows():
    """w(X) is per row: the batch loss is the token-weighted mean of each row's loss on its own."""
    student, teacher, labels = _random(b=3)
    labels[2, :4] = 3  # give row 2 a few valid positions
    loss_fn = TADLoss(top_k=5)
    batch_sum = loss_fn(student, teacher, labels, normalize=False)
    rows = [loss_fn(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], normalize=False) for i in range(3)]
    torch.testing.assert_close(batch_sum, sum(rows), rtol=1e-6, atol=1e-5)
    # ...and changing another row's teacher leaves a row's own contribution unchanged.
    teacher2 = teacher.clone()
    teacher2[1] *= 0.1
    row0_again = loss_fn(student[:1], teacher2[:1], labels[:1], normalize=False)
    torch.testing.assert_close(row0_again, rows[0])


def test_peaked_teacher_tail_mass_1e9():
    """Top-K holds 1 − 1e-9 of the mass: α_T from 1 − Σ top-K would be pure rounding noise in fp32, while
    w(X) = β / mean α_T ≈ 2e9 amplifies the tail term; ours must still match the fp64 reference."""
    b, s, v, k = 2, 16, 500, 5
    top_logits = torch.randn(b, s, k)
    # Tail logits c + noise with (V − K)·e^c ≈ 1e-9·K·e^{mean top logit}: α_T ≈ 1e-9.
    c = torch.log(torch.tensor(1e-9 * k / (v - k)))
    teacher = torch.cat([top_logits, c + 0.3 * torch.randn(b, s, v - k)], dim=-1)
    teacher = teacher[..., torch.randperm(v)]  # the top-K ids are not the first ones
    student = torch.randn(b, s, v)
    labels = torch.randint(0, v, (b, s))
    labels[1, 5:] = -100
    loss_fn = TADLoss(top_k=k)
    loss, grad = _grad(loss_fn, student, teacher, labels)
    ref_loss, ref_grad = _grad(lambda x: tad_reference(x, teacher.double(), labels, top_k=k), student.double())
    _, terms = tad_reference(student, teacher, labels, top_k=k, return_terms=True)
    valid = labels != -100
    alpha = terms["alpha_t"][valid]
    assert 1e-10 < float(alpha.mean()) < 1e-8
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    st = loss_fn.stats()
    assert st["alpha_t_mean"] == pytest.approx(float(alpha.mean()), rel=1e-4)
    tail_ref = (terms["alpha_t"] * terms["dkl2"])[valid].mean()
    assert st["tail_mean"] == pytest.approx(float(tail_ref), rel=1e-3)  # the α_T·D_KL2 term itself, ~1e-8
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6 * float(ref_grad.abs().max()))


def test_bf16_tail_underflows_to_exact_zero():
    """bf16 teacher whose tail is 200 nats below its top-K: in fp32 every tail probability is exactly 0, so
    α_T = 0, w = 0 and the loss is D_KL1 alone, with finite gradients (no 0/0, no log 0)."""
    b, s, v, k = 2, 8, 64, 4
    teacher = torch.full((b, s, v), -200.0)
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(b * s)]).view(b, s, k)
    teacher.scatter_(-1, ids, torch.randn(b, s, k))
    teacher = teacher.bfloat16()
    student = torch.randn(b, s, v).bfloat16()
    labels = torch.randint(0, v, (b, s))
    labels[0, :3] = -100
    loss_fn = TADLoss(top_k=k)
    loss, grad = _grad(loss_fn, student, teacher, labels)
    st = loss_fn.stats()
    assert st["alpha_t_mean"] == 0.0 and st["w_mean"] == 0.0 and st["tail_mean"] == 0.0
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    valid = labels != -100

    def dkl1_mean(x):
        _, terms = tad_reference(x, teacher.double(), labels, top_k=k, return_terms=True)
        return terms["dkl1"][valid].mean()

    ref_loss, ref_grad = _grad(dkl1_mean, student.double())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert st["dkl1_mean"] == pytest.approx(float(ref_loss), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=2**-7, atol=1e-5)


def test_student_tail_underflow_uses_log_space():
    """Student puts all its fp32 mass on the teacher's top-K (its tail is 150 nats below): α_S underflows
    fp32, so log α_S must come from log-sum-exp; the loss is large but finite and matches fp64."""
    b, s, v, k = 1, 6, 80, 3
    teacher = torch.randn(b, s, v)
    ids = teacher.topk(k, -1).indices
    student = torch.full((b, s, v), -150.0).scatter(-1, ids, torch.randn(b, s, k))
    labels = torch.randint(0, v, (b, s))
    loss, grad = _grad(TADLoss(top_k=k), student, teacher, labels)
    ref_loss, ref_grad = _grad(lambda x: tad_reference(x, teacher.double(), labels, top_k=k), student.double())
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert ref_loss > 50  # α_T·log(α_T/α_S) with log α_S ≈ −146: the term the fallback keeps finite
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_teacher_with_masked_logits_gives_no_nan():
    """−inf teacher logits (masked vocabulary entries) have p_T = 0 and contribute nothing."""
    student, teacher, labels = _random(b=2, s=6, v=30)
    teacher[..., 20:] = float("-inf")
    student[0, :, 25:] = float("-inf")  # both −inf: 0·(−inf − (−inf)) must be 0, not NaN
    loss, grad = _grad(TADLoss(top_k=3), student, teacher, labels)
    finite_teacher = teacher[..., :20]
    ref_loss, _ = _grad(lambda x: tad_reference(x, teacher.double(), labels, top_k=3), student.double().clamp_min(-1e4))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert finite_teacher.isfinite().all()


def test_stats_equal_brute_force_means():
    student, teacher, labels = _random(b=3, s=20, v=50)
    k = 5
    loss_fn = TADLoss(top_k=k, beta=1.5)
    loss_fn(list(student.split([6, 14], 1)), list(teacher.split([6, 14], 1)), labels)
    _, t = tad_reference(student, teacher, labels, top_k=k, beta=1.5, return_terms=True)
    valid = labels != -100
    n = int(valid.sum())
    rows_with_tokens = valid.any(-1)
    overlap = [
        len(set(teacher[i, j].topk(k).indices.tolist()) & set(student[i, j].topk(k).indices.tolist())) / k
        for i in range(3)
        for j in range(20)
        if valid[i, j]
    ]
    w_tok = t["w"][:, None].expand_as(t["kl"])
    expected = {
        "num_tokens": n,
        "alpha_t_mean": t["alpha_t"][valid].mean(),
        "alpha_s_mean": t["alpha_s"][valid].mean(),
        "dkl1_mean": t["dkl1"][valid].mean(),
        "tail_mean": (t["alpha_t"] * t["dkl2"])[valid].mean(),
        "weighted_tail_mean": (w_tok * t["alpha_t"] * t["dkl2"])[valid].mean(),
        "kl_mean": t["kl"][valid].mean(),
        "w_mean": t["w"][rows_with_tokens].mean(),  # per row (sequence), rows without tokens excluded
        "topk_overlap_mean": sum(overlap) / n,
        "divergence_mean": (t["dkl1"] + w_tok * t["alpha_t"] * t["dkl2"])[valid].mean(),
    }
    got = loss_fn.stats()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    raw = loss_fn.last_stats  # 0-d tensors (sums), no host sync until read
    assert {"num_tokens", "divergence_sum", "dkl1_sum", "alpha_t_sum", "w_sum", "num_rows"} <= set(raw)
    assert all(torch.is_tensor(x) and x.dim() == 0 for x in raw.values())
    assert float(raw["num_rows"]) == 2


def test_recorded_value_on_hand_written_input():
    """A literal regression value (fp64 reference: 1.42425972...; recorded 2026-11 with K=2, β=2)."""
    student = torch.tensor(
        [
            [[1.0, 0.5, -0.5, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 0.5, -1.0, 0.0]],
            [[0.2, 0.4, 0.6, 0.8, 1.0, 1.2], [-1.0, 2.0, 0.0, 1.0, -2.0, 0.5], [0.0, 1.0, 0.0, -1.0, 0.0, 1.0]],
        ]
    )
    teacher = torch.tensor(
        [
            [[2.0, 1.0, 0.0, -1.0, 0.5, -0.5], [4.0, 0.0, -1.0, 1.0, 0.0, -2.0], [1.0, 1.5, -0.5, 0.0, 2.5, 0.0]],
            [[1.0, -1.0, 2.0, 0.0, 0.5, 1.5], [0.0, 3.0, 1.0, -1.0, 0.0, 0.0], [2.0, 0.0, -2.0, 1.0, 0.9, 0.0]],
        ]
    )
    labels = torch.tensor([[1, 2, -100], [0, 3, 4]])
    assert float(TADLoss(top_k=2)(student, teacher, labels)) == pytest.approx(1.4242597246, abs=1e-6)
    unnormalised = TADLoss(top_k=2, beta=1.5, temperature=2.0, normalize_beta=False)
    assert float(unnormalised(student, teacher, labels)) == pytest.approx(1.0391032352, abs=1e-6)
    assert float(tad_reference(student, teacher, labels, top_k=2)) == pytest.approx(1.4242597246, abs=1e-9)


@pytest.mark.parametrize("vocab", [2560, 2561, 3001])
def test_block_topk_matches_torch_topk(vocab):
    """The block-maxima top-K (used for V >= 4·K·64) selects exactly torch.topk's set, including a last
    partial block, and TADLoss on such a vocabulary still matches the fp64 reference."""
    from tad_torchtune.losses.tad import topk_indices

    x = torch.randn(7, vocab) * 3
    x[0, -1] = 100.0  # the largest entry sits in the partial last block
    x[1, :64] = 50.0 + torch.arange(64.0)  # one block holds the whole top-K
    for k in (1, 5, 10):
        got = topk_indices(x, k).sort(-1).values
        assert torch.equal(got, x.topk(k, -1).indices.sort(-1).values)
    student, teacher = torch.randn(1, 6, vocab), torch.randn(1, 6, vocab) * 3
    labels = torch.randint(0, vocab, (1, 6))
    loss, grad = _grad(TADLoss(top_k=10), student, teacher, labels)
    ref_loss, ref_grad = _grad(lambda s: tad_reference(s, teacher.double(), labels, top_k=10), student.double())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
