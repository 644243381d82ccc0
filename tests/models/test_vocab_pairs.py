"""Teacher/student vocabulary pairs with the real tokenizers (../shared/assets; skipped cleanly when absent).

The KD loss cuts the teacher's extra logit rows (``V_T >= V_S``), which is only right when every id the
student has means the same string for the teacher.
"""

from __future__ import annotations

import json

import torch

from tad_torchtune.models import phi3_medium, phi3_mini, tinyllama_1_1b
from tad_torchtune.models.registry import NAMED


def test_phi3_rows_over_llama2_tokens(shared_assets):
    """Phi-3 (mini and medium, 32064 rows) over Llama-2 / TinyLlama (32000 tokens): ids 0..31999 agree."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(shared_assets / "tokenizers/llama2/tokenizer.model"))
    assert (
        sp.get_piece_size() == 32_000 == NAMED["tinyllama_1_1b"][1]["vocab_size"] == NAMED["llama2_7b"][1]["vocab_size"]
    )
    text = (shared_assets / "text/gsm8k/test.jsonl").read_text().splitlines()[:50]
    text = [json.loads(line)["question"] for line in text]
    for variant, builder in (("phi-3-mini", phi3_mini), ("phi-3-medium", phi3_medium)):
        tok = Tokenizer.from_file(str(shared_assets / f"tokenizers/phi3/{variant}/tokenizer.json"))
        # every shared id is the same piece
        mismatched = [i for i in range(32_000) if tok.id_to_token(i) != sp.id_to_piece(i)]
        assert mismatched == [], (variant, mismatched[:5])
        # Phi-3's extra ids are special tokens above the student's range, inside its 32064 embedding rows
        extra = [tok.id_to_token(i) for i in range(32_000, tok.get_vocab_size())]
        assert extra and all(t.startswith("<|") or t.startswith("<") for t in extra if t is not None)
        with torch.device("meta"):
            rows = builder().tok_embeddings.weight.shape[0]
        assert rows == 32_064 >= tok.get_vocab_size()
        # real text encodes to the same ids (no BOS on either side)
        for q in text:
            assert tok.encode(q, add_special_tokens=False).ids == sp.encode(q), q
    with torch.device("meta"):
        assert tinyllama_1_1b().tok_embeddings.weight.shape[0] == 32_000


def test_qwen_family_shares_one_vocab(shared_assets):
    """Qwen1.5 / Qwen2.5 / Qwen3 teachers and students: 151936 rows over the 151643 BPE tokens (+ specials);
    Qwen2.5-7B alone has 152064 rows (128 padding rows more), which the loss cuts as teacher-only ids."""
    vocab = json.loads((shared_assets / "tokenizers/qwen2/vocab.json").read_text())
    assert len(vocab) == 151_643
    rows = {name: kw["vocab_size"] for name, (fam, kw) in NAMED.items() if fam in ("qwen2", "qwen3")}
    assert rows.pop("qwen2_5_7b") == 152_064
    assert set(rows.values()) == {151_936}, rows


def test_phi2_student_keeps_phi2_vocab(shared_assets):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(shared_assets / "tokenizers/phi2/tokenizer.json"))
    assert (
        tok.get_vocab_size()
        <= 51_200
        == NAMED["phi2_2_7b"][1]["vocab_size"]
        == NAMED["phi2_student_1_1b"][1]["vocab_size"]
    )


def test_qwen2_5_7b_extra_rows_are_never_emitted(shared_assets):
    """Qwen2.5-7B -> 1.5B / 0.5B: the real Qwen tokenizer's largest id (151,664, <|file_sep|>) is below the
    students' 151,936 rows, so the teacher's 128 extra rows (151,936-152,063) are padding the loss may cut."""
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    from tad_torchtune.data.vocab import check_vocab_alignment

    d = shared_assets / "tokenizers/qwen2"
    tok = qwen2_5_tokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    ids = [i for text in ("Hello world", "<|im_start|>user<|im_end|>", "<|file_sep|>") for i in tok.encode(text)]
    assert max(tok.special_tokens.values()) == 151_664 and max(ids) <= 151_664
    assert NAMED["qwen2_5_7b"][1]["vocab_size"] - NAMED["qwen2_5_1_5b"][1]["vocab_size"] == 128
    assert NAMED["qwen2_5_1_5b"][1]["vocab_size"] == NAMED["qwen2_5_0_5b"][1]["vocab_size"] == 151_936
    report = check_vocab_alignment(tok, tok, num_samples=2000)
    assert report.ok and report.teacher_vocab_size == 151_665 <= 151_936
