"""The whole Table-8 pipeline on tiny new-architecture models, through the real recipe:

HF teacher dir -> ``tad-tune init-student`` -> ``knowledge_distillation_tad`` (HFCheckpointer, frozen
embeddings, cosine term) -> ``epoch_0`` that transformers loads with the trained weights.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from tad_torchtune.models.export import load_weights
from tad_torchtune.models.student_init import main as init_main
from tad_torchtune.testing.tiny import write_tiny_assets
from tests.recipes.conftest import TINY_CONFIG, run_in_process

pytestmark = pytest.mark.integration_test

FAMILIES = {
    "phi2": (
        "PHI2",
        lambda: transformers.PhiConfig(
            vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=128, partial_rotary_factor=0.5,
        ),
        dict(_component_="tad_torchtune.models.phi2", num_heads=4, embed_dim=64, max_seq_len=128,
             partial_rotary_factor=0.5),
        dict(intermediate_dim=96, num_layers=4, vocab_size=264),
        dict(intermediate_dim=48, num_layers=2, vocab_size=259),
    ),
    "gemma2": (
        "GEMMA2",
        lambda: transformers.Gemma2Config(
            vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
            query_pre_attn_scalar=16, attn_implementation="eager",
        ),
        dict(_component_="tad_torchtune.models.gemma2", num_heads=4, num_kv_heads=2, head_dim=16, embed_dim=64,
             max_seq_len=128, sliding_window=8, query_pre_attn_scalar=16, attn_impl="flex"),
        dict(intermediate_dim=96, num_layers=3, vocab_size=264),
        dict(intermediate_dim=48, num_layers=1, vocab_size=259),
    ),
    "qwen3": (
        "QWEN3",
        lambda: transformers.Qwen3Config(
            vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=False,
        ),
        dict(_component_="tad_torchtune.models.qwen3", num_heads=4, num_kv_heads=2, head_dim=24, embed_dim=64,
             max_seq_len=128, tie_word_embeddings=False),
        dict(intermediate_dim=96, num_layers=4, vocab_size=264),
        dict(intermediate_dim=48, num_layers=2, vocab_size=259),
    ),
}  # fmt: skip
_EVERY_OTHER = ("phi2", "qwen3")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_student_then_distil_then_load_in_transformers(family, tmp_path):
    model_type, hf_cfg, common, t_dims, s_dims = FAMILIES[family]
    assets = write_tiny_assets(tmp_path / "assets", seed=0)
    teacher_hf = transformers.AutoModelForCausalLM.from_config(hf_cfg())
    teacher_hf.save_pretrained(tmp_path / "teacher")

    cfg = OmegaConf.load(TINY_CONFIG)
    cfg.assets_dir, cfg.output_dir = str(assets), str(tmp_path / "run")
    cfg.model = {**common, **s_dims}
    cfg.teacher_model = {**common, **t_dims}
    cfg.student_init = dict(
        output_dir=str(tmp_path / "student_init"), layers="every_other" if family in _EVERY_OTHER else [1]
    )
    cfg.teacher_checkpointer = dict(
        _component_="tad_torchtune.models.HFCheckpointer", checkpoint_dir=str(tmp_path / "teacher"),
        checkpoint_files=["model.safetensors"], model_type=model_type, output_dir=str(tmp_path / "unused"),
    )  # fmt: skip
    cfg.checkpointer = dict(
        _component_="tad_torchtune.models.HFCheckpointer", checkpoint_dir="${student_init.output_dir}",
        checkpoint_files=["model.safetensors"], model_type=model_type, output_dir="${output_dir}",
    )  # fmt: skip
    cfg.freeze, cfg.cosine_weight, cfg.max_steps_per_epoch = ["tok_embeddings"], 1.0, 2
    cfg.enable_activation_checkpointing = True
    OmegaConf.save(cfg, tmp_path / "exp.yaml")

    assert init_main(["--config", str(tmp_path / "exp.yaml"), "--dtype", "fp32"]) == 0
    init_sd = load_weights(tmp_path / "student_init", family)
    # copied from the teacher: embeddings (first 259 rows) and the selected layer's attention
    t_sd = load_weights(tmp_path / "teacher", family)
    torch.testing.assert_close(init_sd["tok_embeddings.weight"], t_sd["tok_embeddings.weight"][:259])
    # phi2, qwen3: student layer 1 <- teacher layer 2 (every other); gemma2: layer 0 <- teacher layer 1 (explicit)
    s_layer, t_layer = (1, 2) if family in _EVERY_OTHER else (0, 1)
    torch.testing.assert_close(
        init_sd[f"layers.{s_layer}.attn.q_proj.weight"], t_sd[f"layers.{t_layer}.attn.q_proj.weight"]
    )

    recipe = run_in_process(OmegaConf.load(tmp_path / "exp.yaml"))
    losses = [m["loss"] for m in recipe.metrics_history]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(m["cosine_loss"] > 0 for m in recipe.metrics_history)

    out = tmp_path / "run" / "epoch_0"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    final_sd = load_weights(out, family)
    # frozen embeddings unchanged, the rest trained
    torch.testing.assert_close(final_sd["tok_embeddings.weight"], init_sd["tok_embeddings.weight"], rtol=0, atol=0)
    assert not torch.equal(final_sd["layers.0.attn.q_proj.weight"], init_sd["layers.0.attn.q_proj.weight"])
    # transformers computes the same logits as our builder with the trained weights
    from torchtune import config as tt_config

    ours = tt_config.instantiate(cfg.model)
    ours.load_state_dict(final_sd)
    tokens = torch.randint(0, 259, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, ours.eval()(tokens), rtol=0, atol=1e-4)
