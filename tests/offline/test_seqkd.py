"""Seq-KD: batched KV-cache generation against a plain greedy loop, seeded sampling, the recipe's dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tad_torchtune.offline import PromptSource, WindowSource, load_pass, run_pass, seqkd_dataset
from tad_torchtune.offline.seqkd import SeqKDWriter, generate
from tests.offline.conftest import L

EOS = 257  # the byte tokenizer's


def _plain_greedy(model, prompt, max_new: int, stop: int) -> list[int]:
    """No cache, no batch: the whole sequence again for every new token, argmax of the last position."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == stop:
            break
    return out


def _prompts(tiny, n=6):
    src = WindowSource(tiny / "data" / "train.bin", max_seq_len=L)
    # different lengths (left padding), one prompt holding id 0, the pad value of the batch
    return [src.get(i)[: 3 + 2 * i] for i in range(n - 1)] + [np.array([256, 0, 104, 0, 101])]


def test_batched_cached_generation_equals_a_plain_greedy_loop(tiny, models):
    teacher = models[0].model
    prompts = _prompts(tiny)
    got = generate(teacher, prompts, max_new_tokens=24, stop_ids=[EOS])
    assert sum(len(c) for c, _ in got) > 2 * len(prompts)  # not a trivial immediate stop
    for p, (cont, stopped) in zip(prompts, got, strict=True):
        want = _plain_greedy(teacher, p.tolist(), 24, EOS)
        assert cont.tolist() == want
        assert stopped == (want[-1] == EOS)


def test_a_stop_token_ends_its_row(tiny, models):
    teacher = models[0].model
    prompts = _prompts(tiny)
    free = generate(teacher, prompts, max_new_tokens=12, stop_ids=[EOS])
    stop = int(free[0][0][2])  # the third token of row 0 becomes a stop token
    got = generate(teacher, prompts, max_new_tokens=12, stop_ids=[stop])
    assert got[0][0].tolist() == free[0][0][:3].tolist() and got[0][1]
    for (a, _), (b, st) in zip(free, got, strict=True):
        hit = np.flatnonzero(a == stop)
        n = int(hit[0]) + 1 if hit.size else len(a)
        assert b.tolist() == a[:n].tolist() and st == bool(hit.size)


def test_sampling_is_seeded_per_prompt_not_per_batch(tiny, models):
    teacher = models[0].model
    prompts = _prompts(tiny)
    kw = dict(max_new_tokens=10, stop_ids=[EOS], temperature=1.0, top_k=20, seed=3)
    whole = generate(teacher, prompts, indices=range(len(prompts)), **kw)
    alone = [generate(teacher, [p], indices=[i], **kw)[0] for i, p in enumerate(prompts)]
    for (a, _), (b, _) in zip(whole, alone, strict=True):
        assert a.tolist() == b.tolist()
    other = generate(teacher, prompts, indices=range(len(prompts)), **{**kw, "seed": 4})
    assert any(a.tolist() != b.tolist() for (a, _), (b, _) in zip(whole, other, strict=True))


def test_ids_beyond_the_tokenizer_vocabulary_are_never_generated(tiny, models):
    import copy

    teacher = copy.deepcopy(models[0].model)  # 264 output rows; the byte tokenizer has 259 ids

    def favour_260(module, inputs, out):
        out = out.clone()
        out[..., 260] += 100.0
        return out

    teacher.output.register_forward_hook(favour_260)
    prompts = _prompts(tiny)
    free = generate(teacher, prompts, max_new_tokens=4, stop_ids=[EOS])
    assert all(c.tolist() == [260] * 4 for c, _ in free)
    capped = generate(teacher, prompts, max_new_tokens=4, stop_ids=[EOS], vocab_size=259)
    plain = generate(models[0].model, prompts, max_new_tokens=4, stop_ids=[EOS], vocab_size=259)
    assert [c.tolist() for c, _ in capped] == [c.tolist() for c, _ in plain]
    # ... unless it is a stop id (a teacher's own end-of-turn beyond the student's vocabulary): it ends the row
    ended = generate(teacher, prompts, max_new_tokens=4, stop_ids=[EOS, 260], vocab_size=259)
    assert all(c.tolist() == [260] and st for c, st in ended)
    from tad_torchtune.offline.models import LoadedModel

    writer = SeqKDWriter(
        LoadedModel(teacher, "x", {}), max_new_tokens=4, stop_ids=[EOS, 260], vocab_size=259, end_id=EOS
    )
    src = PromptSource(prompts)
    from tad_torchtune.offline.engine import collate

    rec = writer.records(collate(src, range(len(prompts)), torch.device("cpu")))
    assert rec["tokens"].tolist() == [EOS] * len(prompts) and rec["stopped"].all()  # stored as the student's EOS


def test_generation_refuses_a_sequence_longer_than_the_model(models):
    with pytest.raises(ValueError, match="max_seq_len 128"):
        generate(models[0].model, [np.arange(100)], max_new_tokens=40, stop_ids=[EOS])


def test_the_pass_writes_a_dataset_the_recipe_reads(tiny, models, tmp_path):
    from tad_torchtune.data.byte_tokenizer import byte_tokenizer

    prompts = _prompts(tiny)
    tok = byte_tokenizer()
    from tad_torchtune.data import tokenizer_tools as tk

    src = PromptSource(prompts, {"test": True}, tokenizer_fingerprint=tk.fingerprint(tok))
    writer = SeqKDWriter(models[0], max_new_tokens=8, stop_ids=[EOS])
    run_pass(src, writer, tmp_path, shard_size=4, batch_size=3, progress=False)
    data = load_pass(tmp_path)
    assert data["lengths"].tolist() == [len(_plain_greedy(models[0].model, p.tolist(), 8, EOS)) for p in prompts]
    ds = seqkd_dataset(tok, path=tmp_path, max_seq_len=64)
    assert type(ds).shifted_labels is False and len(ds) == len(prompts)
    for i, p in enumerate(prompts):
        item = ds[i]
        cont = _plain_greedy(models[0].model, p.tolist(), 8, EOS)
        assert item["tokens"] == p.tolist() + cont
        assert item["labels"] == [-100] * len(p) + cont
    other = PromptSource(prompts, {"test": True}, tokenizer_fingerprint="0123456789abcdef")
    run_pass(other, writer, tmp_path / "b", shard_size=4, progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        seqkd_dataset(tok, path=tmp_path / "b")


def test_orcamel_prompts_end_where_the_answer_starts(tmp_path):
    import json

    from tad_torchtune.data.byte_tokenizer import byte_tokenizer
    from tad_torchtune.data.orcamel import build_prompt_template, tokenize_example
    from tad_torchtune.offline.seqkd import orcamel_prompts

    rows = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "Name a prime.", "answer": "7"}]
    (tmp_path / "orca.json").write_text(json.dumps(rows))
    tok = byte_tokenizer()
    prompts, desc = orcamel_prompts(tok, [(tmp_path / "orca.json", "question", "answer")])
    assert len(prompts) == 2 and desc["orcamel"][0][1:] == ["question", "answer"]
    for row, prompt in zip(rows, prompts, strict=True):
        full, mask = tokenize_example(tok, row["question"], "xyz", build_prompt_template("qa"))
        assert full[: len(prompt)] == prompt  # what the student sees before the answer in SFT
        assert bytes(full[len(prompt) : len(prompt) + 3]) == b"xyz"
        assert all(mask[: len(prompt)])  # the whole prompt is masked in SFT
