"""ORCAMEL: prompt masking token by token, truncation counts, templates, packing."""

from __future__ import annotations

import json

import pytest
from torchtune.data import padded_collate_sft

from tad_torchtune.data import InstructionDataset, instruction_dataset, orcamel_dataset
from tests.data.byte_tokenizer import ByteTokenizer

ORCA_ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\nThe answer is 5."},
    {"question": "A train goes 60 km/h for 2 h. How far?", "answer": "Distance = 60 * 2 = 120 km."},
    {"question": "Is 7 prime?", "answer": "Yes: its only divisors are 1 and 7."},
    {"question": "", "answer": "rows with an empty side are dropped"},
]
CAMEL_ROWS = [
    {"role_1": "Mathematician", "message_1": "Solve x^2 = 4.", "message_2": "x = 2 or x = -2."},
    {"role_1": "Mathematician", "message_1": "Differentiate x^3.", "message_2": "3x^2"},
]


@pytest.fixture
def sample_files(tmp_path):
    orca, camel = tmp_path / "orca.jsonl", tmp_path / "camel.json"
    orca.write_text("".join(json.dumps(r) + "\n" for r in ORCA_ROWS))
    camel.write_text(json.dumps(CAMEL_ROWS))
    return orca, camel


def test_only_answer_tokens_and_eos_carry_labels_on_a_self_made_sample(sample_files):
    orca, camel = sample_files
    tok = ByteTokenizer()
    ds = orcamel_dataset(tok, orca_source=orca, camel_source=camel)
    assert type(ds).shifted_labels is False
    pairs = [(r["question"], r["answer"]) for r in ORCA_ROWS[:3]] + [
        (r["message_1"], r["message_2"]) for r in CAMEL_ROWS
    ]
    assert len(ds) == len(pairs) and ds.num_truncated == 0 and ds.num_dropped == 0
    for (q, a), item in zip(pairs, (ds[i] for i in range(len(ds))), strict=True):
        prompt = tok.encode(f"Question: {q}\nAnswer: ", add_bos=True, add_eos=False)
        answer = tok.encode(a, add_bos=False, add_eos=True)
        assert item["tokens"] == prompt + answer  # unshifted: labels align with tokens
        for t, (tid, lab) in enumerate(zip(item["tokens"], item["labels"], strict=True)):
            assert lab == (-100 if t < len(prompt) else tid), f"position {t}"


def test_gsm8k_with_the_real_llama2_tokenizer_masks_exactly_the_prompt(shared_assets, tmp_path):
    from torchtune.models.llama2 import llama2_tokenizer

    tok = llama2_tokenizer(str(shared_assets / "tokenizers/llama2/tokenizer.model"), prompt_template=None)
    rows = [json.loads(line) for line in open(shared_assets / "text/gsm8k/train.jsonl")][:40]
    camel = tmp_path / "camel.json"
    camel.write_text(json.dumps(CAMEL_ROWS))
    ds = orcamel_dataset(tok, orca_source=shared_assets / "text/gsm8k/train.jsonl", camel_source=camel, max_examples=40)
    assert len(ds) == 40 + len(CAMEL_ROWS)
    for i, row in enumerate(rows):
        item = ds[i]
        # The tokens are the direct encoding of the formatted text (what an eval harness would send) ...
        assert item["tokens"] == tok.encode(f"Question: {row['question']}\nAnswer: {row['answer']}")
        trained = [t for t, lab in zip(item["tokens"], item["labels"], strict=True) if lab != -100]
        masked = [t for t, lab in zip(item["tokens"], item["labels"], strict=True) if lab == -100]
        # ... and token by token, the trained ones are the answer's own encoding (+ EOS), the rest BOS + prompt.
        assert trained == tok.encode(row["answer"], add_bos=False, add_eos=True)
        assert masked[0] == tok.bos_id and tok.decode(masked) == f"Question: {row['question']}\nAnswer:"
        n_prompt = len(masked)
        assert all(lab == -100 for lab in item["labels"][:n_prompt])
        assert item["labels"][n_prompt:] == item["tokens"][n_prompt:]


def test_hf_tokenizer_dir_without_tokenize_messages_splits_at_the_prompt(shared_assets):
    from tad_torchtune.data import load_tokenizer
    from tad_torchtune.data.orcamel import QuestionAnswerFormat, tokenize_example

    hf = load_tokenizer(shared_assets / "tokenizers/phi3/phi-3-mini")
    assert not hasattr(hf, "tokenize_messages")
    rows = [json.loads(line) for line in open(shared_assets / "text/gsm8k/train.jsonl")][:20]
    for row in rows:
        tokens, mask = tokenize_example(hf, row["question"], row["answer"], QuestionAnswerFormat())
        text = f"Question: {row['question']}\nAnswer: {row['answer']}"
        assert tokens == [hf.bos_id, *hf.tokenizer.encode(text, add_special_tokens=False).ids, hf.eos_id]
        n_prompt = sum(mask)
        assert mask == [True] * n_prompt + [False] * (len(tokens) - n_prompt)
        assert hf.tokenizer.decode(tokens[1:n_prompt]) == f"Question: {row['question']}\nAnswer:"


def test_tokenizer_template_is_used_and_a_second_template_is_refused(shared_assets, sample_files):
    from torchtune.models.llama2 import llama2_tokenizer

    orca, _ = sample_files
    chat = llama2_tokenizer(str(shared_assets / "tokenizers/llama2/tokenizer.model"))  # Llama2ChatTemplate
    ds = orcamel_dataset(chat, orca_source=orca, camel_source=None)
    masked = [t for t, lab in zip(ds[0]["tokens"], ds[0]["labels"], strict=True) if lab == -100]
    assert chat.decode(masked).startswith("[INST]")
    with pytest.raises(ValueError, match="prompt_template: null"):
        orcamel_dataset(chat, orca_source=orca, camel_source=None, prompt_template="qa")


def test_truncation_is_counted_and_prompt_only_examples_are_dropped(sample_files, caplog):
    orca, camel = sample_files
    tok = ByteTokenizer()
    full = orcamel_dataset(tok, orca_source=orca, camel_source=camel)
    lengths = [len(full[i]["tokens"]) for i in range(len(full))]
    prompt_lens = [sum(lab == -100 for lab in full[i]["labels"]) for i in range(len(full))]
    max_len = 40
    with caplog.at_level("INFO"):
        ds = orcamel_dataset(tok, orca_source=orca, camel_source=camel, max_seq_len=max_len)
    assert ds.num_truncated == sum(n > max_len for n in lengths)
    assert ds.num_dropped == sum(p >= max_len for p in prompt_lens) and ds.num_dropped > 0
    assert len(ds) == len(full) - ds.num_dropped
    assert all(len(ds[i]["tokens"]) <= max_len for i in range(len(ds)))
    assert f"{ds.num_truncated} truncated to {max_len}" in caplog.text
    # A tokenizer with its own shorter max_seq_len: the cut still happens here, and is counted.
    tok.max_seq_len = max_len
    via_tok = orcamel_dataset(tok, orca_source=orca, camel_source=camel)
    assert tok.max_seq_len == max_len and via_tok.max_seq_len == max_len
    assert (via_tok.num_truncated, via_tok.num_dropped) == (ds.num_truncated, ds.num_dropped)
    assert [via_tok[i] for i in range(len(via_tok))] == [ds[i] for i in range(len(ds))]


def test_camel_folder_of_one_object_json_files_is_read(tmp_path):
    # camel-ai/math ships as a zip of one JSON object per file; rows with other keys in between are fine.
    folder = tmp_path / "camel"
    (folder / "sub").mkdir(parents=True)
    for i, row in enumerate(CAMEL_ROWS):
        (folder / "sub" / f"{i + 1}_1_1.json").write_text(json.dumps({**row, "topic;": "Algebra"}, indent=2))
    ds = orcamel_dataset(ByteTokenizer(), orca_source=None, camel_source=folder)
    assert len(ds) == 2
    got = {ByteTokenizer().decode([t for t, lab in zip(ds[i]["tokens"], ds[i]["labels"], strict=True) if lab != -100])
           for i in range(2)}  # fmt: skip
    assert got == {r["message_2"] for r in CAMEL_ROWS}


def test_generic_columns_collate_and_pack(sample_files):
    orca, _ = sample_files
    tok = ByteTokenizer()
    ds = instruction_dataset(
        tok, sources=[{"source": str(orca), "prompt_column": "question", "answer_column": "answer"}]
    )
    batch = padded_collate_sft([ds[0], ds[1]], padding_idx=tok.pad_id, ignore_idx=-100)
    assert batch["tokens"].shape == batch["labels"].shape
    packed = instruction_dataset(tok, sources=[{"source": str(orca), "prompt_column": "question",
                                                "answer_column": "answer"}], packed=True, max_seq_len=256)  # fmt: skip
    item = packed[0]
    assert len(item["tokens"]) == 256 and int(item["seq_lens"].sum()) == 256
    n_trained = sum(lab != -100 for i in range(len(ds)) for lab in ds[i]["labels"])
    assert int((item["labels"] != -100).sum()) == n_trained
    with pytest.raises(KeyError, match="columns are"):
        InstructionDataset(tok, [{"source": str(orca), "prompt_column": "problem", "answer_column": "answer"}])


def test_builds_are_independent(sample_files):
    """No module-level state: a second build tokenises afresh and sees a changed source (the recipe hands the
    dataset validation built to setup instead: test_kd_tad.py::test_setup_reuses_what_validation_built)."""
    orca, camel = sample_files
    tok = ByteTokenizer()
    first = orcamel_dataset(tok, orca_source=orca, camel_source=camel)
    again = orcamel_dataset(tok, orca_source=orca, camel_source=camel)
    assert again is not first and [again[i] for i in range(len(again))] == [first[i] for i in range(len(first))]
    orca.write_text(orca.read_text() + json.dumps({"question": "New?", "answer": "Yes, a new row."}) + "\n")
    assert len(orcamel_dataset(tok, orca_source=orca, camel_source=camel)) == len(first) + 1


def test_parallel_tokenisation_matches_serial(sample_files):
    orca, camel = sample_files
    tok = ByteTokenizer()
    a = orcamel_dataset(tok, orca_source=orca, camel_source=camel, num_workers=1)
    b = orcamel_dataset(tok, orca_source=orca, camel_source=camel, num_workers=2)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
