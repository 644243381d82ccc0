"""``tad-tune tokenize``: an HF tokenizer folder or file with tokenizer.json only, and a rerun with changed
settings answered in one line naming what differs (no FileExistsError traceback)."""

from __future__ import annotations

import numpy as np
import pytest

from tad_torchtune.data.byte_tokenizer import ByteTokenizer
from tad_torchtune.data.token_file import open_token_file as read_token_file
from tad_torchtune.data.tokenize import main
from tad_torchtune.models.standalone import byte_level_hf_tokenizer

DOCS = ["def f(x):\n    return x", "hello world, again", "café 日本"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS))
    return path


def _expected(bos: bool = True) -> list[int]:
    tok = ByteTokenizer()
    return [t for d in DOCS for t in tok.encode(d, add_bos=bos, add_eos=True)]


@pytest.mark.parametrize("form", ["folder", "file"])
def test_tokenizer_json_alone(tmp_path, corpus, form):
    folder = tmp_path / "tok"
    folder.mkdir()
    byte_level_hf_tokenizer().save(str(folder / "tokenizer.json"))  # BOS <bos>=256, EOS <eos>=257 found by name
    spec = folder if form == "folder" else folder / "tokenizer.json"
    out = tmp_path / "t.bin"
    assert main(["--source", str(corpus), "--tokenizer", str(spec), "--output", str(out), "--num-workers", "1"]) == 0
    tokens, meta = read_token_file(out)
    assert np.asarray(tokens).tolist() == _expected()
    assert (meta["bos_id"], meta["eos_id"]) == (256, 257)


def test_tokenizer_json_without_known_eos_names_the_arg(tmp_path, corpus, capsys):
    tok = byte_level_hf_tokenizer(bos="[B]", eos="[E]", pad="[P]")
    tok.save(str(tmp_path / "tokenizer.json"))
    args = ["--source", str(corpus), "--tokenizer", str(tmp_path / "tokenizer.json"), "--num-workers", "1"]
    assert main(args + ["--output", str(tmp_path / "a.bin")]) == 1
    err = capsys.readouterr().err
    assert "--tokenizer-arg eos_id=N" in err and "Traceback" not in err
    assert main(args + ["--output", str(tmp_path / "b.bin"), "--tokenizer-arg", "eos_id=257", "--no-bos"]) == 0
    assert np.asarray(read_token_file(tmp_path / "b.bin")[0]).tolist() == _expected(bos=False)


def test_rerun_with_other_settings_says_what_differs(tmp_path, corpus, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    byte_level_hf_tokenizer().save(str(folder / "tokenizer.json"))
    base = ["--source", str(corpus), "--tokenizer", str(folder), "--output", str(tmp_path / "t.bin")]
    base += ["--num-workers", "1", "--no-progress"]
    assert main(base) == 0
    assert main(base) == 0  # same settings: nothing to do
    capsys.readouterr()
    assert main(base + ["--max-tokens", "10", "--no-bos"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tad-tune tokenize: ") and len(err.splitlines()) == 1
    assert "max_tokens: None -> 10" in err and "bos_id: 256 -> None" in err and "--overwrite" in err
    assert main(base + ["--max-tokens", "10", "--no-bos", "--overwrite"]) == 0
    assert read_token_file(tmp_path / "t.bin")[1]["max_tokens"] == 10
