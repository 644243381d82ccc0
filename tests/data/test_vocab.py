"""Teacher/student vocabulary alignment check."""

from __future__ import annotations

import pytest

from tad_torchtune.data import VocabMismatchError, check_vocab_alignment
from tests.data.byte_tokenizer import ByteTokenizer


def test_identical_tokenizers_pass_with_every_id_compared():
    report = check_vocab_alignment(ByteTokenizer(), ByteTokenizer())
    assert report.ok and report.num_compared == 259 and not report.mismatches and len(report.teacher_extra_ids) == 0


def test_a_single_swapped_id_is_caught_and_both_tokenizers_are_named():
    teacher, student = ByteTokenizer(), ByteTokenizer(permute=(ord("a"), ord("b")))
    with pytest.raises(VocabMismatchError, match="teacher tokenizer phi3 and student tokenizer tinyllama") as exc:
        check_vocab_alignment(teacher, student, teacher_name="phi3", student_name="tinyllama")
    assert "id 100: teacher 'a' vs student 'b'" in str(exc.value)
    report = check_vocab_alignment(teacher, student, raise_on_mismatch=False)
    assert [m[0] for m in report.mismatches] == [3 + ord("a"), 3 + ord("b")]
    assert check_vocab_alignment(teacher, student, max_mismatch_fraction=0.01).mismatches  # tolerated


def test_teacher_extra_ids_are_reported_and_a_larger_student_is_refused():
    teacher, student = ByteTokenizer(extra_specials=5), ByteTokenizer()
    report = check_vocab_alignment(teacher, student)
    assert report.teacher_extra_ids == range(259, 264)
    assert report.teacher_extra_tokens == {259 + i: f"<extra_{i}>" for i in range(5)}
    assert "5 teacher-only ids 259-263" in report.summary()
    with pytest.raises(VocabMismatchError, match="would get no teacher logits"):
        check_vocab_alignment(student, teacher)
    assert check_vocab_alignment(student, teacher, allow_student_extra_ids=True).student_vocab_size == 264


def test_sampled_comparison_still_covers_special_ids():
    teacher, student = ByteTokenizer(), ByteTokenizer()
    student.special_tokens = {**student.special_tokens, "</s>": 1, "<s>": 2}  # BOS/EOS names swapped
    report = check_vocab_alignment(teacher, student, num_samples=50, raise_on_mismatch=False)
    assert report.num_compared < 259 and {m[0] for m in report.mismatches} == {1, 2}


def test_real_phi3_teacher_and_llama2_student_agree_and_qwen2_does_not(shared_assets):
    from torchtune.models.llama2 import llama2_tokenizer
    from torchtune.models.phi3 import phi3_mini_tokenizer
    from torchtune.models.qwen2 import qwen2_tokenizer

    from tad_torchtune.data import load_tokenizer

    tok_dir = shared_assets / "tokenizers"
    llama = llama2_tokenizer(str(tok_dir / "llama2/tokenizer.model"))
    for teacher in (
        phi3_mini_tokenizer(str(tok_dir / "llama2/tokenizer.model")),
        load_tokenizer(tok_dir / "phi3/phi-3-mini"),
    ):
        report = check_vocab_alignment(teacher, llama)
        assert report.num_compared == 32000 and not report.mismatches
        assert report.teacher_extra_ids == range(32000, 32011) and report.teacher_extra_tokens[32000] == "<|endoftext|>"
    qwen = qwen2_tokenizer(str(tok_dir / "qwen2/vocab.json"), str(tok_dir / "qwen2/merges.txt"))
    with pytest.raises(VocabMismatchError, match="Qwen2Tokenizer.*Llama2Tokenizer"):
        check_vocab_alignment(qwen, llama)
