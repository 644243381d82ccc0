"""Production losses (chunked, closed-form gradients) against the plain fp64 references, Liger-style.

Every loss is checked on its value *and* its student-logit gradient, in three input layouts (list of uneven
chunks, full ``[B, S, V]`` tensor, torchtune's flattened ``[N, V]`` + ``[N]``), on awkward shapes: chunk
sizes that do not divide S, ignored positions bunched in one chunk, a row with no valid position, and a
teacher vocabulary strictly larger than the student's (cut before any softmax).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch

from tad_torchtune import ForwardKLLoss, JSDLoss, ReverseKLLoss, SymmetricKLLoss, TADLoss, ToDiLoss
from tad_torchtune.losses import reference as ref

B, S, V, EXTRA = 3, 47, 123, 7
CHUNKS = [10, 20, 17]  # chunk 1 (positions 10..29) is entirely ignored in row 0; row 1 has no valid position

# (id, production loss, matching reference); τ ≠ 1 and several K for TAD.
CASES: list[tuple[str, Callable[[], torch.nn.Module], Callable[..., torch.Tensor]]] = [
    ("tad_k1", lambda: TADLoss(top_k=1), partial(ref.tad_reference, top_k=1)),
    ("tad_k5_tau", lambda: TADLoss(top_k=5, temperature=1.7), partial(ref.tad_reference, top_k=5, temperature=1.7)),
    ("tad_k20_beta", lambda: TADLoss(top_k=20, beta=0.5), partial(ref.tad_reference, top_k=20, beta=0.5)),
    (
        "tad_unnormalised",
        lambda: TADLoss(top_k=5, beta=3.0, normalize_beta=False, temperature=0.7),
        partial(ref.tad_reference, top_k=5, beta=3.0, normalize_beta=False, temperature=0.7),
    ),
    ("fkl", lambda: ForwardKLLoss(temperature=2.0), partial(ref.forward_kl_reference, temperature=2.0)),
    ("rkl", lambda: ReverseKLLoss(temperature=1.3), partial(ref.reverse_kl_reference, temperature=1.3)),
    ("skl", lambda: SymmetricKLLoss(sym_kd_ratio=0.3), partial(ref.symmetric_kl_reference, sym_kd_ratio=0.3)),
    ("jsd", lambda: JSDLoss(beta=0.3), partial(ref.jsd_reference, beta=0.3)),
    ("todi", lambda: ToDiLoss(temperature=1.5), partial(ref.todi_reference, temperature=1.5)),
]
IDS = [c[0] for c in CASES]


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student = (torch.randn(B, S, V) * 2.0).to(dtype)
    teacher = (torch.randn(B, S, V + EXTRA) * 3.0).to(dtype)  # sharper than the student, V_T > V
    labels = torch.randint(0, V, (B, S))
    labels[0, 10:30] = -100
    labels[1] = -100
    labels[2, ::5] = -100
    return student, teacher, labels


def _run(loss_fn, student, teacher, labels, layout: str, normalize: bool = True):
    """Loss and student gradient (as a full ``[B, S, V]`` tensor in fp64) for one input layout."""
    x = student.clone().requires_grad_(True)
    if layout == "chunks":
        pieces = list(x.split(CHUNKS, dim=1))
        loss = loss_fn(pieces, list(teacher.split(CHUNKS, dim=1)), labels, normalize=normalize)
    elif layout == "full":
        loss = loss_fn(x, teacher, labels, normalize=normalize)
    else:  # torchtune's flattened form: one row of N = B·S positions
        loss = loss_fn(x.reshape(-1, V), teacher.reshape(-1, V + EXTRA), labels.reshape(-1), normalize=normalize)
    loss.backward()
    return loss.detach().double(), x.grad.double()


def _reference(ref_fn, student, teacher, labels, dtype=torch.float64, normalize=True, flat=False):
    x = student.detach().to(dtype).requires_grad_(True)
    t = teacher.to(dtype)
    if flat:  # the flattened form is one sequence: TAD's w(X) is shared by all N positions
        loss = ref_fn(x.reshape(1, -1, V), t.reshape(1, -1, V + EXTRA), labels.reshape(1, -1), normalize=normalize)
    else:
        loss = ref_fn(x, t, labels, normalize=normalize)
    loss.backward()
    return loss.detach().double(), x.grad.double()


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["chunks", "full", "flat"])
def test_fp32_matches_fp64_reference(case, layout):
    _, make, ref_fn = case
    student, teacher, labels = _inputs(torch.float32)
    loss, grad = _run(make(), student, teacher, labels, layout)
    ref_loss, ref_grad = _reference(ref_fn, student, teacher, labels, flat=layout == "flat")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    # Ignored positions (a whole chunk of row 0, all of row 1) get exactly zero gradient.
    assert grad[0, 10:30].abs().max() == 0 and grad[1].abs().max() == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chunked_equals_full_and_sum_reduction(case):
    _, make, ref_fn = case
    student, teacher, labels = _inputs(torch.float32)
    loss_fn = make()
    loss_fn.num_output_chunks = 5  # 47 positions in 5 pieces: sizes 10,10,9,9,9 (do not divide S)
    chunked = _run(loss_fn, student, teacher, labels, "chunks")
    full = _run(loss_fn, student, teacher, labels, "full")
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], full[1], rtol=1e-5, atol=1e-9)
    # normalize=False returns the sum over valid tokens (the recipe divides by the step's token count).
    summed, summed_grad = _run(loss_fn, student, teacher, labels, "chunks", normalize=False)
    n_valid = int((labels != -100).sum())
    torch.testing.assert_close(summed, chunked[0] * n_valid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(summed_grad, chunked[1] * n_valid, rtol=1e-4, atol=1e-7)
    ref_sum, _ = _reference(ref_fn, student, teacher, labels, normalize=False)
    torch.testing.assert_close(summed, ref_sum, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["chunks", "full"])
def test_bf16_no_worse_than_low_precision_reference(case, layout):
    """bf16 inputs: judged against the fp64 ground truth on the same (bf16-rounded) inputs, the production
    loss must be no less accurate than the same maths done naively in bf16 (value and gradient)."""
    _, make, ref_fn = case
    student, teacher, labels = _inputs(torch.bfloat16)
    loss, grad = _run(make(), student, teacher, labels, layout)
    gt_loss, gt_grad = _reference(ref_fn, student, teacher, labels)
    low_loss, low_grad = _reference(ref_fn, student, teacher, labels, dtype=torch.bfloat16)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (loss - gt_loss).abs() <= (low_loss - gt_loss).abs() + 1e-5 * gt_loss.abs()
    # The gradient is returned in bf16 (the logits' dtype): one rounding of a value computed in fp32.
    assert (grad - gt_grad).abs().max() <= (low_grad - gt_grad).abs().max() + 1e-6
    torch.testing.assert_close(grad, gt_grad, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identical_logits_give_zero_loss_and_gradient(case):
    _, make, _ = case
    logits = torch.randn(2, 9, 40) * 3
    labels = torch.randint(0, 40, (2, 9))
    x = logits.clone().requires_grad_(True)
    loss = make()(x, logits, labels)
    loss.backward()
    assert loss.abs() < 1e-6
    assert x.grad.abs().max() < 1e-7


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_labels_ignored_returns_zero_with_finite_zero_grad(case):
    _, make, _ = case
    student, teacher, labels = _inputs(torch.float32)
    labels = torch.full_like(labels, -100)
    for layout in ("chunks", "full"):
        loss, grad = _run(make(), student, teacher, labels, layout)
        assert loss == 0 and torch.isfinite(grad).all() and grad.abs().max() == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shift_invariance(case):
    """Adding a per-position constant to either model's logits changes no probability, so nothing changes."""
    _, make, _ = case
    student, teacher, labels = _inputs(torch.float32)
    shift_s, shift_t = torch.randn(B, S, 1) * 5, torch.randn(B, S, 1) * 5
    loss, grad = _run(make(), student, teacher, labels, "chunks")
    loss2, grad2 = _run(make(), student + shift_s, teacher + shift_t, labels, "chunks")
    torch.testing.assert_close(loss2, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad2, grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inputs_are_not_modified(case):
    _, make, _ = case
    student, teacher, labels = _inputs(torch.float32)
    s0, t0 = student.clone(), teacher.clone()
    _run(make(), student, teacher, labels, "chunks")
    x = student.clone().requires_grad_(True)
    make()(x, teacher[..., :V].contiguous(), labels).backward()  # fp32, τ maybe 1: inputs used as views
    assert torch.equal(student, s0) and torch.equal(teacher, t0) and torch.equal(x.detach(), s0)


def test_no_grad_call_and_grad_output_scaling():
    student, teacher, labels = _inputs(torch.float32)
    loss_fn = TADLoss(top_k=5)
    ref_loss, ref_grad = _reference(partial(ref.tad_reference, top_k=5), student, teacher, labels)
    with torch.no_grad():
        value = loss_fn(student.clone().requires_grad_(True), teacher, labels)
    assert not value.requires_grad
    torch.testing.assert_close(value.double(), ref_loss, rtol=1e-5, atol=1e-6)
    x = student.clone().requires_grad_(True)
    (0.25 * loss_fn(x, teacher, labels)).backward()  # torchtune's recipe scales the KD term by kd_ratio
    torch.testing.assert_close(x.grad.double(), 0.25 * ref_grad, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k=0"),
        ({"top_k": 2.5}, "top_k=2.5"),
        ({"beta": 0.0}, "beta=0.0"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": -2.0}, "temperature=-2.0"),
        ({"num_output_chunks": 0}, "num_output_chunks=0"),
    ],
)
def test_tad_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TADLoss(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ForwardKLLoss(temperature=0), "temperature=0"),
        (lambda: SymmetricKLLoss(sym_kd_ratio=1.5), "sym_kd_ratio=1.5"),
        (lambda: JSDLoss(beta=1.0), "beta=1.0"),
        (lambda: ToDiLoss(temperature=-1), "temperature=-1"),
    ],
)
def test_baseline_bad_hyperparameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("top_k", [40, 41])
def test_top_k_not_below_vocab_raises_naming_both(top_k):
    s, t, labels = torch.randn(1, 4, 40), torch.randn(1, 4, 40), torch.randint(0, 40, (1, 4))
    with pytest.raises(ValueError, match=rf"top_k={top_k}.*V=40"):
        TADLoss(top_k=top_k)(s, t, labels)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_mismatches_raise(case):
    _, make, _ = case
    loss_fn = make()
    s, labels = torch.randn(2, 6, 30), torch.randint(0, 30, (2, 6))
    with pytest.raises(ValueError, match=r"teacher vocabulary \(29\).*student's \(30\)"):
        loss_fn(s, torch.randn(2, 6, 29), labels)
    with pytest.raises(ValueError, match=r"teacher vocabulary \(29\).*student's \(30\)"):
        loss_fn([s[:, :3], s[:, 3:]], [torch.randn(2, 3, 29)] * 2, labels)
    with pytest.raises(ValueError, match="same B and S_c"):
        loss_fn([s[:, :3], s[:, 3:]], [torch.randn(2, 3, 30), torch.randn(1, 3, 30)], labels)
    with pytest.raises(ValueError, match=r"labels are \(2, 5\)"):
        loss_fn([s[:, :3], s[:, 3:]], [torch.randn(2, 3, 30)] * 2, labels[:, :5])
    with pytest.raises(ValueError, match=r"teacher \(3, 6, 30\)"):
        loss_fn(s, torch.randn(3, 6, 30), labels)
    with pytest.raises(ValueError, match=r"labels \(2, 7\)"):
        loss_fn(s, torch.randn(2, 6, 30), torch.randint(0, 30, (2, 7)))
    with pytest.raises(ValueError, match="both be lists of chunks or both be tensors"):
        loss_fn([s], torch.randn(2, 6, 30), labels)
