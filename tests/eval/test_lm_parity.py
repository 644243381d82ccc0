"""TorchtuneLM vs lm-eval's own HFLM on the same weights (HF export), through the real simple_evaluate."""

from __future__ import annotations

import pytest
import torch

from tests.eval.conftest import load_torchtune

pytestmark = pytest.mark.integration_test


def _run(lm, task_dir, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=2,
        task_manager=tm,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        verbosity="ERROR",
    )


def _resps(out, task):
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def test_parity_with_hflm(tiny_hf_dir, local_tasks):
    from lm_eval.models.huggingface import HFLM

    from tad_torchtune.eval.lm import TorchtuneLM

    task_dir, tasks = local_tasks
    model, tok = load_torchtune(tiny_hf_dir)
    # max_seq_len 64 forces several rolling windows per document and left-truncated few-shot contexts
    ours = TorchtuneLM(model, tok, batch_size=3, max_seq_len=64, enable_kv_cache=True)
    theirs = HFLM(
        pretrained=str(tiny_hf_dir),
        tokenizer=str(tiny_hf_dir),
        device="cpu",
        dtype="float32",
        batch_size=3,
        max_length=64,
    )
    a, b = _run(ours, task_dir, tasks), _run(theirs, task_dir, tasks)

    ll_a, ll_b = _resps(a, "tiny_mc"), _resps(b, "tiny_mc")
    assert len(ll_a) == 9 and all(len(r) == 4 for r in ll_a)
    for ra, rb in zip(ll_a, ll_b, strict=True):
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(ra, rb, strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-4)
            assert greedy_a == greedy_b
    roll_a, roll_b = _resps(a, "tiny_ppl"), _resps(b, "tiny_ppl")
    assert len(roll_a) == 6
    for ra, rb in zip(roll_a, roll_b, strict=True):
        assert ra[0] == pytest.approx(rb[0], abs=1e-4)
    gen_a, gen_b = _resps(a, "tiny_gen"), _resps(b, "tiny_gen")
    assert gen_a == gen_b
    assert any(g[0] for g in gen_a)  # something was generated, not an empty-string tie
    for task in tasks:
        assert _close(a, b, task), (a["results"][task], b["results"][task])

    # the KV-cache and no-cache paths generate the same text, also in bf16 against itself
    no_cache = TorchtuneLM(model, tok, batch_size=2, max_seq_len=64, enable_kv_cache=False)
    assert _resps(_run(no_cache, task_dir, ["tiny_gen"]), "tiny_gen") == gen_a


def _close(a, b, task):
    for k, v in a["results"][task].items():
        if isinstance(v, float) and abs(v - b["results"][task][k]) > 1e-4 * max(1.0, abs(v)):
            return False
    return True


def test_bf16_and_errors(tiny_hf_dir):
    from lm_eval.api.instance import Instance

    from tad_torchtune.eval.lm import TorchtuneLM

    model, tok = load_torchtune(tiny_hf_dir)
    reqs = [
        Instance("loglikelihood", {}, ("Question: What color is the sky?\nAnswer:", " blue"), 0),
        Instance("loglikelihood", {}, ("", "blue sky"), 1),
    ]
    fp32 = TorchtuneLM(model, tok).loglikelihood(reqs, disable_tqdm=True)
    bf16 = TorchtuneLM(model.to(torch.bfloat16), tok).loglikelihood(reqs, disable_tqdm=True)
    for (x, _), (y, _) in zip(fp32, bf16, strict=True):
        assert y == pytest.approx(x, rel=0.05)
    with pytest.raises(ValueError, match="greedily only"):
        TorchtuneLM(model, tok).generate_until(
            [Instance("generate_until", {}, ("Q", {"until": ["\n"], "do_sample": True, "temperature": 0.7}), 0)]
        )
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        TorchtuneLM(model, tok, max_seq_len=100_000)
