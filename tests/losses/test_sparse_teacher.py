"""SparseTeacherLoss: exact parts equal live TAD/KL, the sampled tail term is unbiased (value and gradient).

The cache records come from the production writer (``records_from_logits``); the references are the live
losses (``TADLoss``, ``ForwardKLLoss``) on the full teacher logits.
"""

from __future__ import annotations

import pytest
import torch

from tad_torchtune.losses import ForwardKLLoss, TADLoss
from tad_torchtune.losses.sparse_teacher import SparseTeacher, SparseTeacherLoss
from tad_torchtune.offline.teacher_cache import records_from_logits

B, S, V = 2, 6, 40


def _inputs(seed: int = 0, spread: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, V, generator=g, dtype=torch.float64).float() * 2
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64).float() * spread
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, -2:] = -100  # ignored positions
    return student, teacher, labels


def _value_and_grad(loss_fn, student, teacher, labels, normalize=True):
    s = student.clone().requires_grad_(True)
    value = loss_fn(s, teacher, labels, normalize=normalize)
    value.backward()
    return value.detach(), s.grad


@pytest.mark.parametrize(
    "top_k,beta,normalize_beta,temperature",
    [(1, 2.0, True, 1.0), (5, 2.0, True, 1.0), (10, 0.7, False, 1.0), (5, 2.0, True, 2.0)],
)
def test_all_exact_cache_equals_live_tad(top_k, beta, normalize_beta, temperature):
    """K_max = V: nothing is sampled, value, gradient and stats equal live TADLoss's."""
    student, teacher, labels = _inputs()
    live = TADLoss(top_k=top_k, beta=beta, normalize_beta=normalize_beta, temperature=temperature)
    cached = SparseTeacherLoss("tad", top_k, beta, normalize_beta, temperature, num_output_chunks=3)
    recs = records_from_logits(teacher, V, 0, temperature=temperature)
    v_live, g_live = _value_and_grad(live, student, teacher, labels)
    v_cache, g_cache = _value_and_grad(cached, student, recs, labels)
    torch.testing.assert_close(v_cache, v_live, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_cache, g_live, rtol=1e-4, atol=1e-7)
    live_stats, cache_stats = live.stats(), cached.stats()
    for key in ("dkl1_mean", "tail_mean", "kl_mean", "alpha_t_mean", "w_mean", "divergence_mean"):
        assert cache_stats[key] == pytest.approx(live_stats[key], rel=1e-5, abs=1e-7), key


def test_all_exact_cache_equals_live_forward_kl_chunked_input():
    student, teacher, labels = _inputs(1)
    recs = records_from_logits(teacher, V, 0)
    v_live, g_live = _value_and_grad(ForwardKLLoss(), student, teacher, labels, normalize=False)
    chunks = student.clone().requires_grad_(True)
    v_cache = SparseTeacherLoss("kl")(list(chunks.split([2, 4], dim=1)), recs, labels, normalize=False)
    v_cache.backward()
    torch.testing.assert_close(v_cache.detach(), v_live, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunks.grad, g_live, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("top_k,k_max", [(1, 4), (5, 5), (5, 12)])
def test_exact_parts_with_sampled_tail_equal_live(top_k, k_max):
    """K <= K_max < V: D_KL1, α_T and w(X) are exact whatever was drawn."""
    student, teacher, labels = _inputs(2)
    live = TADLoss(top_k=top_k)
    live(student, teacher, labels)
    cached = SparseTeacherLoss("tad", top_k)
    cached(student, records_from_logits(teacher, k_max, 3, torch.Generator().manual_seed(5)), labels)
    for key in ("dkl1_mean", "alpha_t_mean", "w_mean"):
        assert cached.stats()[key] == pytest.approx(live.stats()[key], rel=2e-6, abs=1e-8), key


def _draws(loss_fn, student, teacher, labels, k_max, m, reps):
    """Loss and gradient of ``reps`` independent caches (independent draws), plus their means and SEs."""
    values, grads = [], []
    for r in range(reps):
        recs = records_from_logits(teacher, k_max, m, torch.Generator().manual_seed(1000 + r))
        v, g = _value_and_grad(loss_fn, student, recs, labels, normalize=False)
        values.append(v.double())
        grads.append(g.double())
    values, grads = torch.stack(values), torch.stack(grads)
    se = lambda x: x.std(0) / reps**0.5  # noqa: E731
    return values.mean(0), se(values), grads.mean(0), se(grads)


@pytest.mark.parametrize("divergence", ["tad", "kl"])
def test_sampled_tail_is_unbiased(divergence):
    """Mean over 3000 independent draws within 4 standard errors of the exact loss, and within 5 SE (Bonferroni
    over the 480 coordinates) of the exact gradient; the SEs are measured from the same draws. A wide teacher
    (spread 1) puts 45% of the mass in the sampled tail, so the tail term is what is tested."""
    student, teacher, labels = _inputs(3, spread=1.0)
    top_k, k_max, m, reps = 3, 8, 4, 3000
    live = TADLoss(top_k=top_k) if divergence == "tad" else ForwardKLLoss()
    v_exact, g_exact = _value_and_grad(live, student, teacher, labels, normalize=False)
    cached = SparseTeacherLoss(divergence, top_k)
    v_mean, v_se, g_mean, g_se = _draws(cached, student, teacher, labels, k_max, m, reps)
    assert v_se > 1e-3  # the draws do vary: the test has power
    assert abs(v_mean - v_exact.double()) <= 4 * v_se, (float(v_mean), float(v_exact), float(v_se))
    err = (g_mean - g_exact.double()).abs()
    assert bool((err <= 5 * g_se + 1e-6).all()), float((err / (g_se + 1e-12)).max())
    # Coordinates with no spread (top-K_max ids, ignored rows) are exact, not merely unbiased.
    exact = g_se == 0
    assert bool(exact.any())
    torch.testing.assert_close(g_mean[exact], g_exact.double()[exact], rtol=1e-5, atol=1e-7)


def test_dropping_the_tail_samples_is_detected_as_biased():
    """Negative control for the unbiasedness test: the same statistic with the draws ignored (m treated as
    0, i.e. a top-K-only cache) lies far outside 4 SE of the exact value."""
    student, teacher, labels = _inputs(3, spread=1.0)
    v_exact, _ = _value_and_grad(TADLoss(top_k=3), student, teacher, labels, normalize=False)
    recs = records_from_logits(teacher, 8, 4, torch.Generator().manual_seed(0))
    no_draws = SparseTeacher(*recs[:4], recs.sample_ids[..., :0])
    v_biased, _ = _value_and_grad(SparseTeacherLoss("tad", 3), student, no_draws, labels, normalize=False)
    _, v_se, _, _ = _draws(SparseTeacherLoss("tad", 3), student, teacher, labels, 8, 4, 200)
    assert abs(v_biased - v_exact) > 20 * v_se


def test_refusals():
    student, teacher, labels = _inputs()
    recs = records_from_logits(teacher, 4, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exceeds the cache's K_max=4"):
        SparseTeacherLoss("tad", 5)(student, recs, labels)
    with pytest.raises(ValueError, match="at least one draw"):
        records_from_logits(teacher, 4, 0)
    with pytest.raises(ValueError, match="divergence must be"):
        SparseTeacherLoss("jsd")
    with pytest.raises(ValueError, match="supports tad_torchtune.TADLoss"):
        from tad_torchtune.losses import JSDLoss

        SparseTeacherLoss.like(JSDLoss())
    like = SparseTeacherLoss.like(TADLoss(top_k=7, beta=3.0, temperature=2.0))
    assert (like.divergence, like.top_k, like.beta, like.temperature) == ("tad", 7, 3.0, 2.0)
