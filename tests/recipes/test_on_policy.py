"""On-policy distillation (``on_policy:``): generation, the loss on the student's samples, λ = 0, resume, 2 ranks."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchtune.models.qwen2._component_builders import qwen2

from tad_torchtune.losses.reference import reverse_kl_reference, tad_reference
from tad_torchtune.testing.tiny import STUDENT_KWARGS, TEACHER_KWARGS, TINY_CONFIG_PATH
from tad_torchtune.training import on_policy as op
from tad_torchtune.training.on_policy import OnPolicy, OnPolicySettings, generate, row_seed
from tad_torchtune.validate import validate_config
from tests.recipes.conftest import read_disk_log, run_cli, run_in_process, tiny_cfg
from tests.recipes.test_kd_tad import RECORDED_GRAD_NORM, RECORDED_LOSS

pytestmark = pytest.mark.integration_test

ON_POLICY_CONFIG = TINY_CONFIG_PATH.with_name("tiny_cpu_on_policy.yaml")
EOS, PAD = 257, 258


def on_policy_cfg(assets: Path, output_dir: Path, **overrides):
    """``configs/tiny_cpu_on_policy.yaml`` with the given assets/output dir and dotted-key overrides."""
    cfg = OmegaConf.load(ON_POLICY_CONFIG)
    cfg.assets_dir, cfg.output_dir = str(assets), str(output_dir)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = qwen2(**STUDENT_KWARGS)
    with torch.no_grad():
        model.output.weight.mul_(4.0)  # a peaked distribution: greedy and sampled paths differ
    return model.eval()


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g) for n in (5, 9, 1, 7)]


def _gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(row_seed(seed, 1, 0, i)) for i in range(n)]


@pytest.mark.parametrize("sample", [False, True])
def test_kv_cache_generation_equals_recomputation_and_each_row_alone(sample):
    """Batched, left-padded generation with a KV cache = the same without a cache = each row generated alone."""
    model, prompts = _student(), _prompts()
    kw = dict(max_new_tokens=12, stop_ids=[EOS], pad_id=PAD, sample=sample, temperature=0.8, top_p=0.9)
    cached = generate(model, prompts, generators=_gens(3, 4), use_cache=True, **kw)
    full = generate(model, prompts, generators=_gens(3, 4), use_cache=False, **kw)
    assert [t.tolist() for t in cached.tokens] == [t.tolist() for t in full.tokens]
    for a, b in zip(cached.logprobs, full.logprobs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(t.numel() == 12 or t[-1] == EOS for t in cached.tokens)
    for i, p in enumerate(prompts):  # alone: no padding, no mask games
        alone = generate(model, [p], generators=_gens(3, 4)[i : i + 1], use_cache=False, **kw)
        assert alone.tokens[0].tolist() == cached.tokens[i].tolist()
    # The cached loop makes one forward per new token; the tokens are the model's own argmax when greedy.
    assert cached.forward_calls == max(t.numel() for t in cached.tokens)
    if not sample:
        seq = torch.cat([prompts[0], cached.tokens[0]])
        logits = model(seq[None])
        assert logits[0, prompts[0].numel() - 1 : -1].argmax(-1).tolist() == cached.tokens[0].tolist()


def test_stop_token_ends_a_row_and_top_p_keeps_the_nucleus():
    model = _student()
    logits = model(_prompts()[0][None])[0, -1]
    stop = int(logits.argmax())  # the first greedy token is the stop token: every row ends after one token
    out = generate(model, _prompts()[:1], max_new_tokens=8, stop_ids=[stop], pad_id=PAD, sample=False)
    assert out.tokens[0].tolist() == [stop] and out.stopped == [True]
    # top_p so small that only the most likely token remains: sampling = greedy
    kw = dict(max_new_tokens=6, stop_ids=[EOS], pad_id=PAD)
    nucleus = generate(model, _prompts(), sample=True, top_p=1e-6, generators=_gens(5, 4), **kw)
    greedy = generate(model, _prompts(), sample=False, **kw)
    assert [t.tolist() for t in nucleus.tokens] == [t.tolist() for t in greedy.tokens]


def test_draws_are_counter_based():
    """Decisions hit the fraction, are stable, and λ = 0 / 1 are never / always."""
    hits = [op.on_policy_decision(0, s, j, 0.3) for s in range(1, 501) for j in range(4)]
    assert 0.25 < sum(hits) / len(hits) < 0.35
    assert hits == [op.on_policy_decision(0, s, j, 0.3) for s in range(1, 501) for j in range(4)]
    assert not any(op.on_policy_decision(0, s, 0, 0.0) for s in range(100))
    assert all(op.on_policy_decision(0, s, 0, 1.0) for s in range(100))
    assert len({row_seed(0, 1, 0, r) for r in range(64)}) == 64


def test_rollout_uses_no_global_rng_and_repeats_itself():
    """OnPolicy.rollout draws from per-row generators only: the global RNG is untouched, and the same step gives
    the same samples (what an exact resume relies on); another step gives other samples."""
    model = _student()
    prompts = _prompts()
    width = max(p.numel() for p in prompts) + 2
    tokens = torch.full((4, width), PAD)
    labels = torch.full((4, width), -100)
    for i, p in enumerate(prompts):
        tokens[i, : p.numel()] = p
        tokens[i, p.numel() : p.numel() + 2] = torch.tensor([65, EOS])
        labels[i, p.numel() - 1 : p.numel() + 1] = torch.tensor([65, EOS])
    settings = OnPolicySettings(fraction=1.0, max_new_tokens=6)
    hook = OnPolicy(settings, model, None, stop_ids=[EOS], pad_id=PAD, ignore_index=-100, seed=0, max_seq_len=128)
    before = torch.get_rng_state()
    first = hook.rollout([{"tokens": tokens, "labels": labels}], step=3)
    assert torch.equal(torch.get_rng_state(), before)
    again = hook.rollout([{"tokens": tokens, "labels": labels}], step=3)
    other = hook.rollout([{"tokens": tokens, "labels": labels}], step=4)
    assert torch.equal(first[0]["tokens"], again[0]["tokens"]) and torch.equal(first[0]["labels"], again[0]["labels"])
    assert not torch.equal(first[0]["tokens"], other[0]["tokens"])
    # prompts are kept, references replaced; the model is back in the mode it was in
    for i, p in enumerate(prompts):
        assert first[0]["tokens"][i, : p.numel()].tolist() == p.tolist()
    assert not model.training


def test_prompt_lengths_and_assembly():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10], [-100] * 5])
    assert op.prompt_lengths(labels, -100).tolist() == [3, 2, 0]
    tokens, new = op.assemble(
        [torch.tensor([1, 2, 3]), torch.tensor([4])], [torch.tensor([9, 8]), torch.tensor([7])], 0, -100
    )
    assert tokens.tolist() == [[1, 2, 3, 9, 8], [4, 7, 0, 0, 0]]
    assert new.tolist() == [[-100, -100, 9, 8, -100], [7, -100, -100, -100, -100]]


@pytest.mark.parametrize(
    "kd_loss,reference",
    [("tad_torchtune.TADLoss", "tad"), ("tad_torchtune.ReverseKLLoss", "rkl")],
    ids=["tad-fused", "reverse-kl-chunked"],
)
def test_loss_and_gradient_on_the_samples_match_a_hand_computation(
    tiny_assets, tmp_path, monkeypatch, kd_loss, reference
):
    """λ = 1, one step: the samples are the student's own (regenerated by hand from the row seeds), the labels
    cover exactly the generated tokens, and loss and grad norm equal CE + divergence in fp64 on those tokens."""
    seen: list[list[dict]] = []
    original = OnPolicy.rollout

    def recording(self, micro, step):
        out = original(self, micro, step)
        seen.append([{k: v.clone() for k, v in b.items()} for b in out])
        return out

    monkeypatch.setattr(OnPolicy, "rollout", recording)
    node = {"_component_": kd_loss, "num_output_chunks": 4}
    if reference == "tad":
        node.update(top_k=10, beta=2.0)
    cfg = on_policy_cfg(tiny_assets, tmp_path / "run", max_steps_per_epoch=1, **{"on_policy.fraction": 1.0})
    cfg.kd_loss = node
    recipe = run_in_process(cfg)
    assert (recipe.fused_loss is not None) == (reference == "tad")
    (micro,) = seen
    student, teacher = qwen2(**STUDENT_KWARGS), qwen2(**TEACHER_KWARGS)
    student.load_state_dict(torch.load(tiny_assets / "student/model.pt", weights_only=True))
    teacher.load_state_dict(torch.load(tiny_assets / "teacher/model.pt", weights_only=True))
    total, n = 0.0, 0
    kd_total = 0.0
    for j, batch in enumerate(micro):
        tokens, labels = batch["tokens"], batch["labels"]
        lens = op.prompt_lengths(labels, -100)
        for i in range(tokens.size(0)):
            p = int(lens[i])
            resp = labels[i][labels[i] != -100]
            assert (labels[i, : p - 1] == -100).all() and labels[
                i, p - 1 : p - 1 + resp.numel()
            ].tolist() == resp.tolist()
            assert tokens[i, p : p + resp.numel()].tolist() == resp.tolist()
            g = torch.Generator().manual_seed(row_seed(0, 1, j, i))
            again = generate(
                student.eval(), [tokens[i, :p]], max_new_tokens=16, stop_ids=[EOS], pad_id=PAD, generators=[g]
            )
            assert again.tokens[0].tolist() == resp.tolist()
        student.train()
        s_logits = student(tokens).double()
        with torch.no_grad():
            t_logits = teacher(tokens).double()
        ce = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        if reference == "tad":
            kd = tad_reference(s_logits, t_logits, labels, top_k=10, beta=2.0, normalize=False)
        else:
            kd = reverse_kl_reference(s_logits, t_logits, labels, normalize=False)
        total = total + ce + kd
        kd_total += kd.detach().item()
        n += int((labels != -100).sum())
    (total / n).backward()
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in student.parameters()))
    m = recipe.metrics_history[0]
    assert m["num_tokens"] == n
    assert m["loss"] == pytest.approx(float(total) / n, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)
    assert m["on_policy_fraction"] == 1.0 and m["on_policy_kd_mean"] == pytest.approx(kd_total / n, rel=1e-5)
    # the student's mean log-prob of its samples is minus its CE on them (T = 1, same weights)
    assert m["on_policy_student_logprob_mean"] == pytest.approx(-m["ce_loss"], rel=1e-4)
    assert m["on_policy_teacher_logprob_mean"] < 0 and 1 <= m["on_policy_gen_len_mean"] <= 16


def test_fraction_zero_is_the_off_policy_recipe(tiny_assets, tmp_path):
    """on_policy.fraction: 0 reproduces the recorded trajectory of configs/tiny_cpu.yaml bit for bit."""
    common = dict(max_steps_per_epoch=3, save_every_n_steps=None)
    off = run_in_process(tiny_cfg(tiny_assets, tmp_path / "off", **common))
    zero = run_in_process(tiny_cfg(tiny_assets, tmp_path / "zero", **common, on_policy={"fraction": 0.0}))
    assert zero._on_policy is None
    assert [m["loss"] for m in zero.metrics_history] == pytest.approx(RECORDED_LOSS, rel=1e-6, abs=0)
    assert [m["grad_norm"] for m in zero.metrics_history] == pytest.approx(RECORDED_GRAD_NORM, rel=1e-6, abs=0)
    timing = ("tokens_per_second_per_gpu", "tflops_per_second_per_gpu", "mfu", "peak_rss_gib")
    for a, b in zip(off.metrics_history, zero.metrics_history, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    for k, v in off.student.state_dict().items():
        assert torch.equal(v, zero.student.state_dict()[k]), k


def test_resume_mid_run_equals_uninterrupted(tiny_assets, tmp_path):
    """λ = 0.5 (a mix of on- and off-policy micro-batches): killed after step 2, resumed, same losses and
    weights as the uninterrupted run (fp32)."""
    common = dict(max_steps_per_epoch=4, save_every_n_steps=1, keep_last_n_checkpoints=None)
    full = run_in_process(on_policy_cfg(tiny_assets, tmp_path / "full", **common))
    fractions = [m["on_policy_fraction"] for m in full.metrics_history]
    assert 0 < sum(fractions) < len(fractions)  # both kinds of micro-batches occur
    out = tmp_path / "resumed"
    shutil.copytree(full._checkpoint_root / "step_0000002", out / "checkpoints" / "step_0000002")
    resumed = run_in_process(on_policy_cfg(tiny_assets, out, resume_from_checkpoint=True, **common))
    keys = ("loss", "grad_norm", "on_policy_fraction", "on_policy_gen_len_mean", "on_policy_kd_mean")
    for a, b in zip(full.metrics_history[2:], resumed.metrics_history, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    for k, v in full.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k


def test_two_processes_match_one(tiny_assets, tmp_path):
    """``tune run --nproc_per_node 2`` (FSDP2, gloo, batch 2 per rank) = one process with batch 4: the same
    samples (row seeds follow the global batch), losses, grad norms and on-policy metrics."""
    common = ["max_steps_per_epoch=3", "save_every_n_steps=null", "on_policy.fraction=0.7"]
    two = tmp_path / "two"
    cmd = ["tune", "run", "--nproc_per_node", "2", "tad_torchtune.recipes.kd_tad", "--config", str(ON_POLICY_CONFIG)]
    run_cli(cmd + [f"assets_dir={tiny_assets}", f"output_dir={two}", "batch_size=2", *common])
    logged = read_disk_log(two)
    one = run_in_process(
        on_policy_cfg(
            tiny_assets, tmp_path / "one", max_steps_per_epoch=3, save_every_n_steps=None, **{"on_policy.fraction": 0.7}
        )
    )
    assert len(logged) == 3 and sum(r["on_policy_fraction"] for r in logged) > 0
    keys = (
        "loss",
        "ce_loss",
        "kd_loss",
        "num_tokens",
        "on_policy_fraction",
        "on_policy_gen_len_mean",
        "on_policy_kd_mean",
    )
    keys += ("on_policy_student_logprob_mean", "on_policy_teacher_logprob_mean")
    for r, m in zip(logged, one.metrics_history, strict=True):
        for key in keys:
            assert (key in r) == (key in m), key
            if key in m:
                assert r[key] == pytest.approx(m[key], rel=1e-5, abs=1e-6), key
        assert r["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-5)


def test_bf16_with_activation_checkpointing_trains_on_policy(tiny_assets, tmp_path):
    """Generation runs under no_grad in eval mode, so activation checkpointing and bf16 weights work unchanged."""
    cfg = on_policy_cfg(
        tiny_assets,
        tmp_path / "run",
        dtype="bf16",
        enable_activation_checkpointing=True,
        max_steps_per_epoch=2,
        **{"on_policy.fraction": 1.0, "on_policy.top_p": 0.9},
    )
    recipe = run_in_process(cfg)
    for m in recipe.metrics_history:
        assert m["on_policy_fraction"] == 1.0 and m["nonfinite_skipped_steps"] == 0
        assert all(math.isfinite(v) for v in m.values())
    assert recipe.student.training  # back in training mode after generating


# --- start-up refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,key,words",
    [
        ({"on_policy.fraction": 1.5}, "on_policy.fraction", "must be in [0, 1]"),
        ({"on_policy.fraction": -0.1}, "on_policy.fraction", "must be in [0, 1]"),
        ({"on_policy.temperature": 0.0}, "on_policy.temperature", "sample: false"),
        ({"on_policy.top_p": 0.0}, "on_policy.top_p", "(0, 1]"),
        ({"on_policy.top_p": 1.5}, "on_policy.top_p", "(0, 1]"),
        ({"on_policy.max_new_tokens": 0}, "on_policy.max_new_tokens", ">= 1"),
        ({"on_policy.max_new_tokens": 100}, "on_policy.max_new_tokens", "lower it to <= 81"),
        ({"on_policy.lambda": 0.5}, "on_policy.lambda", "is not an on_policy key"),
        ({"on_policy.sample": "yes"}, "on_policy.sample", "true or false"),
        ({"kd_weight": 0.0}, "on_policy.fraction", "kd_weight is 0"),
        ({"dataset.packed": True}, "on_policy.fraction", "unpacked"),
    ],
)
def test_bad_settings_are_refused_before_compute(tiny_assets, tmp_path, overrides, key, words):
    cfg = on_policy_cfg(tiny_assets, tmp_path / "out", **overrides)
    problems = [
        p for p in validate_config(cfg, check_data=True, world_size=1) if p.key.startswith(("on_policy", "dataset"))
    ]
    assert [p.key for p in problems] == [key], problems
    assert words in problems[0].message
    # the recipe refuses the same config at construction, before any model exists
    with pytest.raises(Exception, match="on_policy"):
        run_in_process(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_text_data_without_a_prompt_mask_is_refused(tiny_assets, tmp_path):
    cfg = tiny_cfg(tiny_assets, tmp_path / "out", on_policy={"fraction": 0.5, "max_new_tokens": 8})
    problems = validate_config(cfg, check_data=True, world_size=1)
    assert [p.key for p in problems] == ["dataset"] and "no prompt mask" in problems[0].message
    # λ = 0 needs no prompt mask (the section is inert)
    cfg.on_policy.fraction = 0.0
    assert validate_config(cfg, check_data=True, world_size=1) == []


def test_settings_defaults_and_one_message():
    assert OnPolicySettings.from_config(None) == OnPolicySettings()
    with pytest.raises(ValueError, match=r"on_policy.fraction .*; on_policy.top_p"):
        OnPolicySettings.from_config({"fraction": 2, "top_p": 0})


def test_resume_refuses_a_changed_on_policy_setting_but_not_the_metric_switch():
    from tad_torchtune.reliability.run_identity import compare_configs

    old = {"batch_size": 4, "on_policy": {"fraction": 0.5, "max_new_tokens": 16, "log_teacher_logprob": True}}
    new = {"batch_size": 4, "on_policy": {"fraction": 1.0, "max_new_tokens": 16, "log_teacher_logprob": False}}
    refused, changed = compare_configs(old, new, 1, 1)
    assert refused == ["on_policy.fraction: 0.5 -> 1.0"]
    assert changed == ["on_policy.log_teacher_logprob: true -> false"]
    # adding the section to a run that had none changes what it trains on: refused
    refused, _ = compare_configs({"batch_size": 4}, new, 1, 1)
    assert any(r.startswith("on_policy.fraction") for r in refused)
