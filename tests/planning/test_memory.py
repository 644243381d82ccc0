"""Memory plan: closed-form parts, sharding, and the estimate against a measured CPU training step."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tad_torchtune.planning.memory import GIB, estimate_memory, main

STUDENT = dict(
    _component_="torchtune.models.qwen2.qwen2",
    vocab_size=12_000,
    num_layers=3,
    num_heads=8,
    num_kv_heads=8,
    embed_dim=384,
    intermediate_dim=768,
    max_seq_len=512,
)
TEACHER = {**STUDENT, "num_layers": 4, "intermediate_dim": 1152}


def _cfg(**over):
    cfg = dict(
        model=STUDENT,
        teacher_model=TEACHER,
        dtype="fp32",
        batch_size=4,
        dataset=dict(max_seq_len=192),
        optimizer={"_component_": "torch.optim.AdamW"},
        kd_loss={"_component_": "tad_torchtune.TADLoss", "num_output_chunks": 4},
        enable_activation_checkpointing=False,
    )
    cfg.update(over)
    return cfg


def test_parts_closed_form_and_sharding():
    one = estimate_memory(_cfg(), 1)
    p_s = 12_000 * 384 * 2 + 3 * (4 * 384 * 384 + 3 * 384 + 3 * 384 * 768 + 2 * 384) + 384
    assert one.parts["student weights"] == p_s * 4
    assert one.parts["optimizer states"] == 2 * p_s * 4
    two = estimate_memory(_cfg(), 2)
    assert two.parts["student weights"] == one.parts["student weights"] / 2
    assert two.parts["teacher weights"] == one.parts["teacher weights"] / 2
    assert "FSDP gather buffers" in two.parts
    frozen = estimate_memory(_cfg(freeze=["tok_embeddings"]), 1)
    assert one.parts["student grads"] - frozen.parts["student grads"] == 12_000 * 384 * 4
    ac = estimate_memory(_cfg(enable_activation_checkpointing=True), 1)
    assert ac.parts["student activations"] < one.parts["student activations"]


MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from torchtune import config
    from omegaconf import OmegaConf
    from tad_torchtune import TADLoss
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    torch.set_num_threads(1)
    cfg = json.loads(sys.argv[1])
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
    base = rss("VmRSS")
    student = config.instantiate(OmegaConf.create(cfg["model"]))
    teacher = config.instantiate(OmegaConf.create(cfg["teacher_model"])).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    C = cfg["kd_loss"]["num_output_chunks"]
    fused = cfg.get("fused_loss", "auto") != "false"
    if fused:
        from tad_torchtune.losses.fused_linear import FusedLinearDistillationLoss, fused_distillation_loss
        fused_loss = FusedLinearDistillationLoss(TADLoss(), chunk_size=1024)
    else:
        student.set_num_output_chunks(C); teacher.set_num_output_chunks(C)
    ce, kd = CEWithChunkedOutputLoss(num_output_chunks=C), TADLoss(num_output_chunks=C)
    B, S = cfg["batch_size"], cfg["dataset"]["max_seq_len"]
    for _ in range(2):
        tokens = torch.randint(0, 12000, (B, S)); labels = torch.randint(0, 12000, (B, S))
        if fused:
            loss = fused_distillation_loss(student, teacher, tokens, labels, fused_loss, normalize=True,
                                           ce_weight=1.0)
        else:
            with torch.no_grad():
                t_logits = teacher(tokens)
            s_logits = student(tokens)
            loss = ce(s_logits, labels) + kd(s_logits, t_logits, labels)
            del t_logits, s_logits
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        del loss
    print(json.dumps({"peak": rss("VmHWM") - base}))
    """
)


@pytest.mark.parametrize("fused_loss", ["auto", "false"])
def test_estimate_against_measured_cpu_step(fused_loss):
    """Estimate (minus the fixed CUDA overhead a CPU run does not have) within a factor 1.5 of the measured peak,
    on the loss path the recipe would take (fused by default) and on the chunked-logits path."""
    cfg = _cfg(fused_loss=fused_loss)
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(cfg)], capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    plan = estimate_memory(cfg, 1)
    estimate = plan.total_bytes - 1.5 * GIB
    ratio = estimate / measured
    print(f"estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, ratio {ratio:.2f}")
    assert 1 / 1.5 < ratio < 1.5


def test_plan_takes_the_recipes_loss_path():
    """The fused path (the recipe's default for TADLoss on plain heads) is budgeted without logits; the plan
    says which path and why, by the recipe's own decision (training/loss_path.py)."""
    fused = estimate_memory(_cfg(), 1)
    assert "fused loss" in fused.parts and "logits" not in fused.parts
    assert any(n.startswith("loss path: fused") for n in fused.notes)
    t, v, d = 4 * 192, 12_000, 384
    assert fused.parts["fused loss"] == t * d * 4 + t * d * 4 + t * v * 16 + v * d * 4  # fp32: no model-dtype copies
    chunked = estimate_memory(_cfg(fused_loss="false"), 1)
    assert "logits" in chunked.parts and "fused loss" not in chunked.parts
    assert any("loss path: chunked logits (fused_loss: false)" in n for n in chunked.notes)
    rkl = estimate_memory(_cfg(kd_loss={"_component_": "tad_torchtune.ReverseKLLoss"}), 1)
    assert any("kd_loss is ReverseKLLoss" in n for n in rkl.notes)
    sharded = estimate_memory(_cfg(custom_sharded_layers=["output"]), 2)
    assert any("sharded on its own" in n for n in sharded.notes)
    # A larger micro-batch than the slice: only one slice of logits is ever live on the fused path.
    big = estimate_memory(_cfg(batch_size=64), 1)
    assert big.parts["fused loss"] < estimate_memory(_cfg(batch_size=64, fused_loss="false"), 1).parts["logits"] / 5


def test_cli(tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg()))
    assert main(["--config", str(path), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GiB" in out and "optimizer states" in out
    assert main(["--config", str(path), "--capacity-gib", "0.1"]) == 1
    with pytest.raises(SystemExit):
        main(["--help"])
    # A shipped name works like a path; a malformed override or unknown name is one line, exit 1.
    assert main(["--config", "qwen1.5_1.8b_to_1.2b", "--gpus", "2"]) in (0, 1)
    assert "loss path: fused" in capsys.readouterr().out
    assert main(["--config", "no_such_config"]) == 1
    assert main(["--config", str(path), "batch_size"]) == 1
    assert "not key=value" in capsys.readouterr().err
