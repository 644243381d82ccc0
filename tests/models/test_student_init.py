"""Student-from-teacher init: copied tensors equal hand-written teacher slices; identity when nothing shrinks."""

from __future__ import annotations

import pytest
import torch
from torchtune.models.llama3 import llama3
from torchtune.models.qwen2 import qwen2

from tad_torchtune.models.student_init import init_student_from_teacher, select_layers


def test_select_layers():
    assert select_layers(24, "every_other") == list(range(0, 24, 2))
    assert select_layers(42, "every_third") == list(range(0, 42, 3))
    assert len(select_layers(42, "every_third")) == 14  # Gemma2-9B -> 14-layer student (Table 8)
    assert select_layers(32, "first_half") == list(range(16))
    assert select_layers(5, [0, 2, 4]) == [0, 2, 4]
    for bad in ([0, 0], [3, 1], [0, 5]):
        with pytest.raises(ValueError):
            select_layers(5, bad)
    with pytest.raises(ValueError, match="unknown layer spec"):
        select_layers(5, "every_fourth")


def _qwen(d, h, kv, hd_layers, inter, vocab=64):
    return qwen2(
        vocab_size=vocab,
        num_layers=hd_layers,
        num_heads=h,
        num_kv_heads=kv,
        embed_dim=d,
        intermediate_dim=inter,
        max_seq_len=32,
        tie_word_embeddings=False,
    )


def test_identity_when_same_widths():
    """layers=all with every part copied gives the teacher's logits exactly."""
    teacher = _qwen(32, 4, 2, 3, 48).eval()
    student = _qwen(32, 4, 2, 3, 48).eval()
    rep = init_student_from_teacher(student, teacher.state_dict(), [0, 1, 2], copy_mlp=True)
    assert rep["random"] == [] and rep["truncated"] == []
    x = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)


def test_layer_subset_equals_teacher_layers():
    teacher = _qwen(32, 4, 2, 4, 48)
    student = _qwen(32, 4, 2, 2, 48)
    sd = teacher.state_dict()
    rep = init_student_from_teacher(student, sd, select_layers(4, "every_other"), freeze_embeddings=True)
    s = student.state_dict()
    torch.testing.assert_close(s["layers.1.attn.q_proj.weight"], sd["layers.2.attn.q_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(s["layers.1.sa_norm.scale"], sd["layers.2.sa_norm.scale"], rtol=0, atol=0)
    # MLPs stay random by default (paper: Qwen1.5 students)
    assert "layers.0.mlp.w1.weight" in rep["random"]
    assert not torch.equal(s["layers.0.mlp.w1.weight"], sd["layers.0.mlp.w1.weight"])
    assert not student.tok_embeddings.weight.requires_grad and rep["frozen"] == ["tok_embeddings.weight"]


def _ref_rows(w, n_heads, d_t, heads, dims):
    """Plain loop: rows of head h, dim j -> teacher row h*d_t + j."""
    return torch.stack([w[h * d_t + j] for h in heads for j in dims])


def test_per_head_truncation_rotate_half_gqa():
    """Qwen2 (rotate-half RoPE, q/k/v bias): D 48->32, head_dim 12->8, 4 q heads, 2 kv heads."""
    teacher = _qwen(48, 4, 2, 2, 64)
    student = _qwen(32, 4, 2, 1, 40)
    sd = teacher.state_dict()
    rep = init_student_from_teacher(student, sd, [1], copy_mlp=True)
    s = student.state_dict()
    dims_qk = [0, 1, 2, 3, 6, 7, 8, 9]  # rotate-half pairs (i, i+6) of the teacher kept together
    q_ref = _ref_rows(sd["layers.1.attn.q_proj.weight"], 4, 12, range(4), dims_qk)[:, :32]
    torch.testing.assert_close(s["layers.0.attn.q_proj.weight"], q_ref, rtol=0, atol=0)
    k_ref = _ref_rows(sd["layers.1.attn.k_proj.weight"], 2, 12, range(2), dims_qk)[:, :32]
    torch.testing.assert_close(s["layers.0.attn.k_proj.weight"], k_ref, rtol=0, atol=0)
    v_ref = _ref_rows(sd["layers.1.attn.v_proj.weight"], 2, 12, range(2), range(8))[:, :32]
    torch.testing.assert_close(s["layers.0.attn.v_proj.weight"], v_ref, rtol=0, atol=0)
    qb = sd["layers.1.attn.q_proj.bias"]
    torch.testing.assert_close(
        s["layers.0.attn.q_proj.bias"], torch.stack([qb[h * 12 + j] for h in range(4) for j in dims_qk])
    )
    o = sd["layers.1.attn.output_proj.weight"]  # [48, 48]: columns are (head, dim)
    o_ref = torch.stack([o[:32, h * 12 + j] for h in range(4) for j in range(8)], dim=1)
    torch.testing.assert_close(s["layers.0.attn.output_proj.weight"], o_ref, rtol=0, atol=0)
    torch.testing.assert_close(s["layers.0.mlp.w1.weight"], sd["layers.1.mlp.w1.weight"][:40, :32])
    torch.testing.assert_close(s["layers.0.mlp.w2.weight"], sd["layers.1.mlp.w2.weight"][:32, :40])
    torch.testing.assert_close(s["tok_embeddings.weight"], sd["tok_embeddings.weight"][:, :32])
    torch.testing.assert_close(s["output.weight"], sd["output.weight"][:, :32])
    torch.testing.assert_close(s["norm.scale"], sd["norm.scale"][:32])
    assert "layers.0.attn.q_proj.weight" in rep["truncated"] and rep["random"] == []


def test_per_head_truncation_interleaved_fewer_heads():
    """Llama3 (interleaved RoPE): 8 q / 2 kv heads of dim 8 -> 4 q / 1 kv heads of dim 4."""
    teacher = llama3(
        vocab_size=64, num_layers=2, num_heads=8, num_kv_heads=2, embed_dim=64, max_seq_len=32, intermediate_dim=96
    )
    student = llama3(
        vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=1, embed_dim=16, max_seq_len=32, intermediate_dim=32
    )
    sd = teacher.state_dict()
    init_student_from_teacher(student, sd, [0], teacher_num_heads=8)
    s = student.state_dict()
    # GQA groups of 4 q heads per kv head in the teacher: student kv head 0 keeps q heads 0..3
    q_ref = _ref_rows(sd["layers.0.attn.q_proj.weight"], 8, 8, range(4), range(4))[:, :16]
    torch.testing.assert_close(s["layers.0.attn.q_proj.weight"], q_ref, rtol=0, atol=0)
    k_ref = _ref_rows(sd["layers.0.attn.k_proj.weight"], 2, 8, [0], range(4))[:, :16]
    torch.testing.assert_close(s["layers.0.attn.k_proj.weight"], k_ref, rtol=0, atol=0)


def test_errors_are_clear():
    teacher = _qwen(32, 4, 2, 2, 48)
    with pytest.raises(ValueError, match="student with 1 layers"):
        init_student_from_teacher(_qwen(32, 4, 2, 1, 48), teacher.state_dict(), [0, 1])
    with pytest.raises(ValueError, match="larger than the teacher"):
        init_student_from_teacher(_qwen(64, 4, 2, 1, 48), teacher.state_dict(), [0])
