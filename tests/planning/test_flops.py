"""FLOP accounting against torch's own FLOP counter, the paper's figure, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tad_torchtune.planning.flops import (
    KNOWN_PEAKS,
    FlopsPerToken,
    estimate_flops_per_token,
    forward_flops_per_token,
    main,
    measure_matmul_peak,
    model_dims,
    parse_peak_flops,
)

TINY = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=48, max_seq_len=64)


@pytest.mark.parametrize("family", ["qwen2", "phi2"])
def test_weight_flops_match_torch_flop_counter(family):
    """Student forward + backward matmul FLOPs of a real torchtune decoder, counted by torch, equal ours
    (attention scores excluded: CPU SDPA kernels are not in torch's FLOP registry; checked separately)."""
    if family == "qwen2":
        from torchtune.models.qwen2 import qwen2 as build
    else:
        from tad_torchtune.models.phi2 import phi2 as build
    model = build(**TINY) if family == "qwen2" else build(**TINY, partial_rotary_factor=0.5)
    b, s = 2, 16
    tokens = torch.randint(0, TINY["vocab_size"], (b, s))
    with FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    counted = counter.get_total_flops() / (b * s)
    f = estimate_flops_per_token({**TINY, "family": family}, None, s, loss="none")
    fwd = forward_flops_per_token(model_dims({**TINY, "family": family}), s)
    assert f.total - 3 * fwd["attention"] == counted


def test_attention_term_closed_form():
    dims = model_dims(TINY)
    # QKᵀ and AV: 2 matmuls × 2 FLOPs × head_dim × heads × keys seen (causal mean (S+1)/2).
    assert forward_flops_per_token(dims, 16)["attention"] == 2 * 4 * 8 * 4 * 8.5
    assert forward_flops_per_token(dims, 16, causal=False)["attention"] == 2 * 4 * 8 * 4 * 16


def test_paper_figure_qwen_1_8b_to_1_2b():
    """docs/spec.md §5: 9.2 (KD) vs 9.3 (TAD) PFLOPs per 1M tokens; ours: 9.27 for both (TAD adds O(V))."""
    kl = estimate_flops_per_token("qwen1_5_student_1_2b", "qwen1_5_1_8b", 2048, loss="kl")
    tad = estimate_flops_per_token("qwen1_5_student_1_2b", "qwen1_5_1_8b", 2048, loss="tad")
    assert 9.2 <= kl.pflops_per_million_tokens() <= 9.35
    assert 0 < tad.total - kl.total < 1e-3 * kl.total
    fused = estimate_flops_per_token("qwen1_5_student_1_2b", "qwen1_5_1_8b", 2048, loss="tad", fused=True)
    assert fused.total - tad.total == 2 * 2048 * 151_936  # the first pass's teacher projection
    # Slices of >= 2048 tokens hold whole rows: one teacher pass, the same count as the materialised path.
    for chunk, extra in ((1024, 2 * 2048 * 151_936), (2048, 0)):
        f = estimate_flops_per_token("qwen1_5_student_1_2b", "qwen1_5_1_8b", 2048, fused=True, fused_chunk_size=chunk)
        assert f.total - tad.total == extra
    kl_fused = estimate_flops_per_token("qwen1_5_student_1_2b", "qwen1_5_1_8b", 2048, loss="kl", fused=True)
    assert kl_fused.total == kl.total  # forward KL: one pass either way


def test_teacher_vocab_cut_and_errors():
    teacher = {**TINY, "vocab_size": 80}
    dense = estimate_flops_per_token(TINY, teacher, 16, loss="kl")
    fused = estimate_flops_per_token(TINY, teacher, 16, loss="kl", fused=True)
    assert dense.teacher_output == 2 * 32 * 80 and fused.teacher_output == 2 * 32 * 64
    with pytest.raises(ValueError, match="lacks \\['intermediate_dim'\\]"):
        model_dims({k: v for k, v in TINY.items() if k != "intermediate_dim"})
    with pytest.raises(ValueError, match="needs a teacher"):
        estimate_flops_per_token(TINY, None, 16, loss="tad")
    with pytest.raises(ValueError, match="unknown model name 'nope'"):
        model_dims("nope")


def test_flops_per_token_is_the_estimate_cached_per_length():
    teacher = {**TINY, "num_layers": 3, "vocab_size": 80}
    fpt = FlopsPerToken(TINY, teacher, loss="tad", fused=True)
    for s in (7, 16, 7):
        assert fpt(s) == estimate_flops_per_token(TINY, teacher, s, loss="tad", fused=True).total
    assert sorted(fpt._cache) == [1, 7, 16]  # length 1 is evaluated at construction to check the arguments
    # Only the causal attention term grows with the length: S 15 -> 17 adds one key per query on average,
    # 4·d_h·H FLOPs per layer: the student's 2 layers forward + backward (x3), the teacher's 3 forward.
    assert fpt(17) - fpt(15) == (3 * 2 + 3) * 4 * 8 * 4
    with pytest.raises(ValueError, match="needs a teacher"):
        FlopsPerToken(TINY, None, loss="kl")


def test_parse_peak_flops():
    assert parse_peak_flops(None) is None
    assert parse_peak_flops(989e12) == parse_peak_flops("989e12") == parse_peak_flops(int(989e12)) == 989e12
    assert parse_peak_flops("H100_SXM") == parse_peak_flops("h100-sxm") == KNOWN_PEAKS["h100-sxm"]
    for bad, why in [(-1, "> 0"), (0.0, "> 0"), ("inf", "> 0"), ("h1OO", "neither a number"), (True, "not a FLOP")]:
        with pytest.raises(ValueError, match=why) as err:
            parse_peak_flops(bad, "my_key")
        assert f"my_key={bad!r}" in str(err.value)


def test_matmul_peak_probe():
    peak = measure_matmul_peak("cpu", size=128, iters=2)
    assert math.isfinite(peak) and peak > 1e6


def test_cli_json_from_config(capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    assert main(["--config", str(config), "--json", "--peak", "1e12", "--tokens", "1e6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seq_len"] == 48 and out["per_token"]["total"] > 0
    assert out["total_flops"] == pytest.approx(out["per_token"]["total"] * 1e6)
    assert main(["--loss", "kl"]) == 0
    assert "PFLOPs per 1M tokens" in capsys.readouterr().out
