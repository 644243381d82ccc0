"""HF export of torchtune students: transformers loads them with no missing/unexpected keys and the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torchtune.models.llama3 import llama3
from torchtune.models.llama3_1 import llama3_1
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.phi3 import phi3
from torchtune.models.qwen2 import qwen2

from tad_torchtune.models.export import export_hf, load_weights, main
from tad_torchtune.models.gemma2 import gemma2
from tad_torchtune.models.phi2 import phi2
from tad_torchtune.models.qwen3 import qwen3

V, S = 80, 12

STUDENTS = {
    # (family, builder kwargs) -- tiny, but each keeps its family's special features
    "qwen2": ("qwen2", dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                            intermediate_dim=48, max_seq_len=64, norm_eps=1e-6, tie_word_embeddings=True)),
    "llama3": ("llama3", dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                              intermediate_dim=48, max_seq_len=64, rope_base=10_000)),
    "phi3": ("phi3", dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                          intermediate_dim=48, max_seq_len=64)),
    "phi2": ("phi2", dict(vocab_size=V, num_layers=2, num_heads=4, embed_dim=40, intermediate_dim=64,
                          max_seq_len=64, partial_rotary_factor=0.4)),
    "qwen3_tied": ("qwen3", dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, head_dim=12,
                                 intermediate_dim=48, max_seq_len=64, tie_word_embeddings=True)),
    "qwen3_untied": ("qwen3", dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                                   intermediate_dim=48, max_seq_len=64, tie_word_embeddings=False)),
    "llama3_1": ("llama3_1", dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                                  intermediate_dim=48, max_seq_len=64, rope_base=500_000, scale_factor=8)),
    "llama3_2": ("llama3_2", dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                                  intermediate_dim=48, max_seq_len=64, rope_base=500_000, scale_factor=32)),
    "gemma2": ("gemma2", dict(vocab_size=V, num_layers=3, num_heads=4, head_dim=16, num_kv_heads=2, embed_dim=32,
                              intermediate_dim=48, max_seq_len=64, sliding_window=4, query_pre_attn_scalar=12,
                              attn_logit_softcapping=4.0, final_logit_softcapping=2.0)),
}  # fmt: skip
BUILDERS = {
    "qwen2": qwen2,
    "llama3": llama3,
    "phi3": phi3,
    "phi2": phi2,
    "gemma2": gemma2,
    "qwen3": qwen3,
    "llama3_1": llama3_1,
    "llama3_2": llama3_2,
}


def _random(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if ("norm" in name or name.endswith("bias")) else 0.2)
    return model.eval()


@pytest.mark.parametrize("name", list(STUDENTS))
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    family, kwargs = STUDENTS[name]
    model = _random(BUILDERS[family](**kwargs))
    out = export_hf(model, family, kwargs, tmp_path / "hf", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.num_hidden_layers == kwargs["num_layers"]
    tokens = torch.randint(0, V, (2, S))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, model(tokens), rtol=0, atol=1e-4)
    # and back: the HF directory converts to the same torchtune state dict
    back = load_weights(out, family)
    ref = {k: v for k, v in model.state_dict().items() if not k.endswith("cache") and "theta" not in k}
    assert sorted(back) == sorted(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_cli_from_config_with_tokenizer(tmp_path):
    """`tad-tune export-hf`: weights saved as torchtune .pt + the experiment YAML -> HF dir with tokenizer."""
    family, kwargs = STUDENTS["qwen2"]
    model = _random(qwen2(**kwargs))
    (tmp_path / "w").mkdir()
    torch.save(model.state_dict(), tmp_path / "w" / "model.pt")
    cfg = "model:\n  _component_: torchtune.models.qwen2.qwen2\n" + "".join(f"  {k}: {v}\n" for k, v in kwargs.items())
    (tmp_path / "exp.yaml").write_text(cfg)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    (tok / "generation_config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": 6}))
    rc = main(
        ["--config", str(tmp_path / "exp.yaml"), "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "hf")]
        + ["--tokenizer-dir", str(tok), "--dtype", "bf16"]
    )
    assert rc == 0
    out = tmp_path / "hf"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["eos_token_id"] == 6 and cfg_json["num_hidden_layers"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        main(["--help"])


def test_init_student_cli(tmp_path):
    """`tad-tune init-student`: HF teacher dir -> initialised student HF dir, loadable by the recipe's checkpointer."""
    from tad_torchtune.models.checkpointer import HFCheckpointer
    from tad_torchtune.models.student_init import main as init_main

    tcfg = transformers.Qwen2Config(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    teacher = transformers.AutoModelForCausalLM.from_config(tcfg)
    teacher.save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "tokenizer.json").write_text("{}")  # copied into the student dir as is
    (tmp_path / "exp.yaml").write_text(
        f"""
model:
  _component_: torchtune.models.qwen2.qwen2
  vocab_size: {V}
  num_layers: 2
  num_heads: 4
  num_kv_heads: 4
  embed_dim: 32
  intermediate_dim: 40
  max_seq_len: 64
teacher_model:
  _component_: torchtune.models.qwen2.qwen2
  vocab_size: {V}
  num_layers: 4
  num_heads: 4
  num_kv_heads: 4
  embed_dim: 48
  intermediate_dim: 64
  max_seq_len: 64
teacher_checkpointer:
  _component_: tad_torchtune.models.HFCheckpointer
  checkpoint_dir: {tmp_path}/teacher
  checkpoint_files: [model.safetensors]
  model_type: QWEN2
  output_dir: {tmp_path}/unused
student_init:
  output_dir: {tmp_path}/student_init
  layers: every_other
  copy_mlp: false
"""
    )
    assert init_main(["--config", str(tmp_path / "exp.yaml"), "--dtype", "fp32"]) == 0
    out = tmp_path / "student_init"
    assert (out / "tokenizer.json").read_text() == "{}"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ck = HFCheckpointer(str(out), ["model.safetensors"], "QWEN2", str(tmp_path / "run"))
    sd = ck.load_checkpoint()["model"]
    t = teacher.state_dict()
    # student layer 1 = teacher layer 2; v_proj rows: 4 heads x first 8 of 12 dims; columns: first 32
    v_ref = t["model.layers.2.self_attn.v_proj.weight"].view(4, 12, 48)[:, :8, :32].reshape(32, 32)
    torch.testing.assert_close(sd["layers.1.attn.v_proj.weight"], v_ref, rtol=0, atol=0)
    # MLP random with the N(0, 0.02) init, not torchtune's default kaiming-uniform
    assert abs(sd["layers.0.mlp.w1.weight"].std().item() - 0.02) < 0.004


def test_init_student_cli_qwen3_pair(tmp_path):
    """`tad-tune init-student` for a Qwen3 pair shaped like Qwen3-8B -> Qwen3-1.7B (untied teacher, tied student,
    half the query heads per GQA group, a layer count every_other cannot give): layers spread uniformly, the
    student directory loads in Qwen3ForCausalLM and through our QWEN3 checkpointer."""
    import json as _json

    from tad_torchtune.models.checkpointer import HFCheckpointer
    from tad_torchtune.models.student_init import main as init_main

    tcfg = transformers.Qwen3Config(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=5, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    teacher = transformers.AutoModelForCausalLM.from_config(tcfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    teacher.save_pretrained(tmp_path / "teacher")
    dims = f"vocab_size: {V}\n  num_kv_heads: 2\n  head_dim: 8\n  max_seq_len: 64\n"
    (tmp_path / "exp.yaml").write_text(
        f"""
model:
  _component_: tad_torchtune.models.qwen3
  num_layers: 3
  num_heads: 4
  embed_dim: 32
  intermediate_dim: 40
  tie_word_embeddings: true
  {dims}
teacher_model:
  _component_: tad_torchtune.models.qwen3
  num_layers: 5
  num_heads: 8
  embed_dim: 48
  intermediate_dim: 64
  tie_word_embeddings: false
  {dims}
teacher_checkpointer:
  _component_: tad_torchtune.models.HFCheckpointer
  checkpoint_dir: {tmp_path}/teacher
  checkpoint_files: [model.safetensors]
  model_type: QWEN3
  output_dir: {tmp_path}/unused
"""
    )
    out = tmp_path / "student_init"
    overrides = [f"student_init.output_dir={out}", "student_init.copy_mlp=true", "student_init.tokenizer_dir=null"]
    assert init_main(["--config", str(tmp_path / "exp.yaml"), "--dtype", "fp32", *overrides]) == 0
    assert _json.loads((out / "student_init_report.json").read_text())["layers"] == [0, 2, 4]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.tie_word_embeddings
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sd = HFCheckpointer(str(out), ["model.safetensors"], "QWEN3", str(tmp_path / "run")).load_checkpoint()["model"]
    t = teacher.state_dict()
    # student layer 1 = teacher layer 2; q heads (0, 1 | 4, 5) of the teacher's groups of 4; columns [:32]
    q_ref = t["model.layers.2.self_attn.q_proj.weight"].view(8, 8, 48)[[0, 1, 4, 5], :, :32].reshape(32, 32)
    torch.testing.assert_close(sd["layers.1.attn.q_proj.weight"], q_ref, rtol=0, atol=0)
    torch.testing.assert_close(sd["layers.1.attn.k_norm.scale"], t["model.layers.2.self_attn.k_norm.weight"])
    torch.testing.assert_close(sd["tok_embeddings.weight"], t["model.embed_tokens.weight"][:, :32])
