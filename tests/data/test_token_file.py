"""Token files: round trip against direct tokenisation, dtype choice, EOS placement, limits, interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tad_torchtune.data import open_token_file, read_meta, write_token_file
from tad_torchtune.data import token_file as tf
from tests.data.byte_tokenizer import ByteTokenizer

DOCS = [
    "The first document.",
    "",  # empty rows are dropped
    "Second one, with ünïcode and 数学.",
    "   ",
    "x^2 + y^2 = z^2\nand a new line",
] + [f"document number {i} " * (i % 7 + 1) for i in range(200)]


def _write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({column: d, "other": 1}) + "\n")
    return path


def _reference(tok, docs: list[str]) -> np.ndarray:
    ref: list[int] = []
    for d in docs:
        if d.strip():
            ref += tok.encode(d, add_bos=True, add_eos=True)
    return np.asarray(ref, dtype=np.int64)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_round_trip_equals_direct_tokenisation_with_eos_after_every_document(tmp_path, num_workers):
    tok = ByteTokenizer()
    src = _write_jsonl(tmp_path / "c.jsonl", DOCS)
    meta = write_token_file(tmp_path / "c.bin", tok, src, num_workers=num_workers, batch_docs=7, progress=False)
    tokens, meta2 = open_token_file(tmp_path / "c.bin")
    ref = _reference(tok, DOCS)
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), ref)
    assert meta == meta2 and meta["completed"] and meta["dtype"] == "uint16"
    n_docs = sum(bool(d.strip()) for d in DOCS)
    assert meta["num_documents"] == n_docs and meta["num_tokens"] == ref.size
    # EOS closes every document and is followed by the next document's BOS.
    eos_at = np.flatnonzero(np.asarray(tokens) == tok.eos_id)
    assert eos_at.size == n_docs and eos_at[-1] == ref.size - 1
    assert (np.asarray(tokens)[eos_at[:-1] + 1] == tok.bos_id).all() and tokens[0] == tok.bos_id
    assert meta["max_id"] == ref.max() and meta["num_bytes"] == sum(len(d.encode()) for d in DOCS if d.strip())


def test_real_llama2_tokenizer_round_trip_on_gsm8k_text_column(shared_assets, tmp_path):
    from torchtune.models.llama2 import llama2_tokenizer

    tok = llama2_tokenizer(str(shared_assets / "tokenizers/llama2/tokenizer.model"))
    rows = [json.loads(line) for line in open(shared_assets / "text/gsm8k/test.jsonl")][:300]
    src = tmp_path / "g.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_token_file(tmp_path / "g.bin", tok, src, text_column="answer", num_workers=2, batch_docs=64, progress=False)
    tokens, meta = open_token_file(tmp_path / "g.bin")
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), _reference(tok, [r["answer"] for r in rows]))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 32000 and meta["eos_id"] == 2


def test_gzipped_jsonl_shards_in_a_directory_are_read_in_order(tmp_path):
    import gzip

    tok = ByteTokenizer()
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate((DOCS[:50], DOCS[50:])):
        with gzip.open(shards / f"part-{i:02d}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    write_token_file(tmp_path / "z.bin", tok, shards, num_workers=0, progress=False)
    tokens, meta = open_token_file(tmp_path / "z.bin")
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), _reference(tok, DOCS))
    assert [Path(f).name for f in meta["source"]["files"]] == ["part-00.jsonl.gz", "part-01.jsonl.gz"]


def test_txt_input_splits_documents_by_paragraph(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("para one\nstill one\n\npara two\n\n\npara three\n")
    meta = write_token_file(tmp_path / "t.bin", tok, tmp_path / "a.txt", num_workers=0, progress=False)
    tokens, _ = open_token_file(tmp_path / "t.bin")
    assert meta["num_documents"] == 3
    texts = tok.decode([int(t) for t in tokens]).split("\n")
    assert "para one" in texts and "para three" in "".join(texts)


@pytest.mark.parametrize(("vocab", "dtype"), [(259, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_dtype_is_uint16_exactly_when_every_id_fits(vocab, dtype):
    assert tf.dtype_for_vocab(vocab) == np.dtype(dtype)


def test_ids_above_65535_round_trip_through_a_uint32_file(tmp_path):
    tok = ByteTokenizer(offset=70_000)
    src = _write_jsonl(tmp_path / "c.jsonl", DOCS[:20])
    meta = write_token_file(tmp_path / "c.bin", tok, src, num_workers=0, progress=False)
    tokens, _ = open_token_file(tmp_path / "c.bin")
    assert meta["dtype"] == "uint32" and tokens.dtype == np.uint32 and tokens.max() > 65535
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), _reference(tok, DOCS[:20]))
    assert (tmp_path / "c.bin").stat().st_size == 4 * meta["num_tokens"]


def test_max_tokens_cuts_exactly_and_counts_the_cut_document(tmp_path):
    tok = ByteTokenizer()
    src = _write_jsonl(tmp_path / "c.jsonl", DOCS)
    ref = _reference(tok, DOCS)
    meta = write_token_file(tmp_path / "c.bin", tok, src, max_tokens=1000, num_workers=2, batch_docs=5, progress=False)
    tokens, _ = open_token_file(tmp_path / "c.bin")
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), ref[:1000])
    assert meta["num_tokens"] == 1000
    cut_mid_doc = ref[999] != tok.eos_id
    assert meta["truncated_last_document"] == cut_mid_doc
    assert meta["num_documents"] == int((ref[:1000] == tok.eos_id).sum()) + int(cut_mid_doc)


def test_interrupted_write_never_looks_complete_and_rerun_resumes(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    src = _write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "c.bin"
    calls = {"n": 0}
    real = tf._encode_docs

    def flaky(texts):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(tf, "_encode_docs", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_token_file(out, tok, src, num_workers=0, batch_docs=10, checkpoint_every_s=0, progress=False)
    assert not out.exists() and not tf.meta_path(out).exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        read_meta(out)
    progress = json.loads(tf._progress_path(out).read_text())
    assert progress["rows"] == 30  # three whole batches were written before the interrupt

    calls["n"] = -1000  # no more failures; count the batches the rerun tokenises
    meta = write_token_file(out, tok, src, num_workers=0, batch_docs=10, checkpoint_every_s=0, progress=False)
    tokens, _ = open_token_file(out)
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), _reference(tok, DOCS))
    assert calls["n"] + 1000 == -(-(len(DOCS) - 30) // 10)  # only the rows after the resume point
    assert meta["num_documents"] == sum(bool(d.strip()) for d in DOCS)
    assert not tf._progress_path(out).exists() and not tf._partial_path(out).exists()


def test_changed_settings_restart_instead_of_resuming(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    src = _write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "c.bin"
    real = tf._encode_docs
    state = {"n": 0}

    def flaky(texts):
        state["n"] += 1
        if state["n"] == 3:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(tf, "_encode_docs", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_token_file(out, tok, src, num_workers=0, batch_docs=10, checkpoint_every_s=0, progress=False)
    monkeypatch.setattr(tf, "_encode_docs", real)
    write_token_file(out, tok, src, num_workers=0, batch_docs=10, progress=False, add_bos=False)
    tokens, meta = open_token_file(out)
    assert meta["bos_id"] is None
    ref = [t for d in DOCS if d.strip() for t in tok.encode(d, add_bos=False, add_eos=True)]
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), ref)


def test_complete_file_is_kept_unless_overwrite(tmp_path):
    tok = ByteTokenizer()
    src = _write_jsonl(tmp_path / "c.jsonl", DOCS[:10])
    out = tmp_path / "c.bin"
    first = write_token_file(out, tok, src, num_workers=0, progress=False)
    assert write_token_file(out, tok, src, num_workers=0, progress=False)["created"] == first["created"]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_token_file(out, tok, src, num_workers=0, progress=False, add_bos=False)
    meta = write_token_file(out, tok, src, num_workers=0, progress=False, add_bos=False, overwrite=True)
    assert meta["bos_id"] is None and open_token_file(out)[0][0] != tok.bos_id


def test_damaged_or_foreign_files_are_refused_with_the_fix(tmp_path):
    tok = ByteTokenizer()
    out = tmp_path / "c.bin"
    write_token_file(out, tok, _write_jsonl(tmp_path / "c.jsonl", DOCS[:10]), num_workers=0, progress=False)
    with open(out, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="damaged"):
        open_token_file(out)
    with pytest.raises(ValueError, match=r"must end in \.bin"):
        write_token_file(tmp_path / "c.tok", tok, tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        write_token_file(tmp_path / "d.bin", tok, str(tmp_path / "typo.jsonl"), num_workers=0)
    with pytest.raises(KeyError, match="columns are"):
        write_token_file(tmp_path / "d.bin", tok, tmp_path / "c.jsonl", text_column="body", num_workers=0)


def test_cli_tokenize_with_a_torchtune_builder_and_an_hf_tokenizer_dir(shared_assets, tmp_path, capsys):
    from torchtune.models.llama2 import llama2_tokenizer

    from tad_torchtune.cli import main
    from tad_torchtune.data import load_tokenizer

    docs = [r["question"] for r in map(json.loads, open(shared_assets / "text/gsm8k/test.jsonl"))][:100]
    src = _write_jsonl(tmp_path / "q.jsonl", docs)
    model = str(shared_assets / "tokenizers/llama2/tokenizer.model")
    rc = main(["tokenize", "--source", str(src), "--output", str(tmp_path / "a.bin"), "--no-progress",
               "--tokenizer", "torchtune.models.llama2.llama2_tokenizer", "--tokenizer-arg", f"path={model}",
               "--num-workers", "2", "--max-tokens", "2e3"])  # fmt: skip
    assert rc == 0 and "2,000 tokens" in capsys.readouterr().out
    tokens, meta = open_token_file(tmp_path / "a.bin")
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), _reference(llama2_tokenizer(model), docs)[:2000])
    assert meta["tokenizer"]["spec"]["path"] == model

    # Phi-3-mini's HF tokenizer.json: same pieces as Llama-2, but EOS is <|endoftext|> = 32000.
    hf_dir = shared_assets / "tokenizers/phi3/phi-3-mini"
    assert main(["tokenize", "--source", str(src), "--output", str(tmp_path / "b.bin"), "--no-progress",
                 "--tokenizer", str(hf_dir), "--num-workers", "1"]) == 0  # fmt: skip
    tokens, meta = open_token_file(tmp_path / "b.bin")
    hf = load_tokenizer(hf_dir)
    assert meta["eos_id"] == 32000 and meta["vocab_size"] == 32011
    ref = [t for d in docs for t in [1, *hf.tokenizer.encode(d, add_special_tokens=False).ids, 32000]]
    np.testing.assert_array_equal(np.asarray(tokens, dtype=np.int64), ref)


def test_cli_help_exits_cleanly(capsys):
    from tad_torchtune.data.tokenize import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--max-tokens" in capsys.readouterr().out


def test_cli_interrupt_says_how_to_resume_and_the_rerun_completes(tmp_path, monkeypatch, capsys):
    from tad_torchtune.data.tokenize import main

    src = _write_jsonl(tmp_path / "c.jsonl", DOCS)
    argv = ["--source", str(src), "--output", str(tmp_path / "c.bin"), "--no-progress", "--num-workers", "0",
            "--tokenizer", "tests.data.byte_tokenizer.ByteTokenizer", "--batch-docs", "10"]  # fmt: skip
    real = tf._encode_docs
    calls = {"n": 0}

    def flaky(texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(tf, "_encode_docs", flaky)
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert main(argv) == 0
    np.testing.assert_array_equal(np.asarray(open_token_file(tmp_path / "c.bin")[0], dtype=np.int64),
                                  _reference(ByteTokenizer(), DOCS))  # fmt: skip
