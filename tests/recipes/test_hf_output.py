"""HF in, HF out: with torchtune's HF checkpointer the final student is a transformers-loadable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torchtune.models.qwen2._component_builders import qwen2
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

from tad_torchtune.testing.tiny import STUDENT_KWARGS
from tests.recipes.conftest import run_in_process, tiny_cfg

pytestmark = pytest.mark.integration_test


def _hf_config(kw: dict) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": kw["vocab_size"],
        "hidden_size": kw["embed_dim"],
        "intermediate_size": kw["intermediate_dim"],
        "num_hidden_layers": kw["num_layers"],
        "num_attention_heads": kw["num_heads"],
        "num_key_value_heads": kw["num_kv_heads"],
        "max_position_embeddings": kw["max_seq_len"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def test_final_student_is_hf_and_matches(tiny_assets, tmp_path):
    kw = STUDENT_KWARGS
    hf_dir = tmp_path / "student_hf"
    hf_dir.mkdir()
    tune_sd = torch.load(tiny_assets / "student/model.pt", weights_only=True)
    hf_sd = qwen2_tune_to_hf(tune_sd, num_heads=kw["num_heads"], num_kv_heads=kw["num_kv_heads"], dim=kw["embed_dim"])
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(_hf_config(kw)))

    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_assets, out, max_steps_per_epoch=2)
    cfg.checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(hf_dir),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "QWEN2",
        "output_dir": str(out),
    }
    recipe = run_in_process(cfg)
    # Same start as the torchtune-format run: the recorded first loss.
    from tests.recipes.test_kd_tad import RECORDED_LOSS

    assert recipe.metrics_history[0]["loss"] == pytest.approx(RECORDED_LOSS[0], rel=1e-6)

    final_dir = out / "epoch_0"
    assert (final_dir / "config.json").is_file()
    from transformers import Qwen2ForCausalLM

    hf_model = Qwen2ForCausalLM.from_pretrained(final_dir, torch_dtype=torch.float32).eval()
    trained = qwen2(**kw).eval()
    trained.load_state_dict(recipe.student.state_dict())
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = trained(tokens)
        theirs = hf_model(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # And the weights moved away from the input checkpoint.
    assert not torch.equal(tune_sd["layers.0.mlp.w1.weight"], recipe.student.state_dict()["layers.0.mlp.w1.weight"])


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_student_hf_in_hf_out_matches_transformers(tie, tiny_assets, tmp_path):
    """A Qwen3 student (q/k norms, head_dim != D/H) through the recipe with our HFCheckpointer (``QWEN3``): the
    final epoch_0 directory loads in transformers' Qwen3ForCausalLM with no missing/unexpected keys and the same
    logits as the trained model, and so does `tad-tune export-hf` of that directory."""
    from omegaconf import OmegaConf
    from transformers import Qwen3ForCausalLM

    from tad_torchtune.models.export import export_hf
    from tad_torchtune.models.export import main as export_main
    from tad_torchtune.models.qwen3 import qwen3

    kw = dict(
        vocab_size=259, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
        max_seq_len=128, head_dim=24, tie_word_embeddings=tie,
    )  # fmt: skip
    student = qwen3(**kw)
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.05)
    hf_dir = export_hf(student, "qwen3", kw, tmp_path / "student_hf")

    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_assets, out, max_steps_per_epoch=2)
    cfg.model = {"_component_": "tad_torchtune.models.qwen3", **kw}
    cfg.checkpointer = {
        "_component_": "tad_torchtune.models.HFCheckpointer",
        "checkpoint_dir": str(hf_dir),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "QWEN3",
        "output_dir": str(out),
    }
    recipe = run_in_process(cfg)
    trained = qwen3(**kw).eval()
    trained.load_state_dict(recipe.student.state_dict())
    assert not torch.equal(trained.layers[0].attn.q_norm.scale, student.layers[0].attn.q_norm.scale)  # it trained

    tokens = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        ours = trained(tokens)
    exported = tmp_path / "exported"
    (tmp_path / "exp.yaml").write_text(OmegaConf.to_yaml({"model": cfg.model}))
    rc = export_main(
        ["--config", str(tmp_path / "exp.yaml"), "--weights", str(out / "epoch_0"), "--out", str(exported)]
    )
    assert rc == 0
    for d in (out / "epoch_0", exported):
        hf_model, info = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (d, info)
        with torch.no_grad():
            theirs = hf_model.eval()(tokens).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
