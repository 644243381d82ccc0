"""The demo's student (SmolLM2 layers, tied embeddings, the GGUF's BPE tokenizer) exports to an HF folder that
transformers loads as the same model and tokenizer, and that the stock ``lm_eval`` CLI scores as ``eval_tad``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tad_torchtune.demo import run as demo
from tad_torchtune.models.export import main as export_main
from tests.models.test_export_standalone import _eval_tad, _stock_lm_eval, assert_same_scores

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def demo_run(demo_cache_dir, tmp_path_factory) -> Path:
    """A run folder as the demo leaves it with --keep-checkpoints: torchtune_config.yaml and epoch_0 (a 2-layer
    student from teacher layers 0 and 29), plus the demo's results.json two folders up."""
    from safetensors.torch import save_file

    from tad_torchtune.demo.smollm2 import convert, load_state_dict, smollm2
    from tad_torchtune.models.student_init import init_student_from_teacher

    root = tmp_path_factory.mktemp("demo_export")
    teacher_dir = convert(demo_cache_dir)
    sd, _ = load_state_dict(demo_cache_dir)
    student = smollm2(num_layers=2, max_seq_len=128)
    init_student_from_teacher(student, sd, [0, 29], copy_mlp=True)
    run_dir = root / "runs" / "tad"
    (run_dir / "epoch_0").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(run_dir / "epoch_0" / "m.safetensors"))
    cfg = demo.recipe_config(demo.DemoOptions(), "TAD", teacher_dir, root / "student_init", run_dir, 2)
    OmegaConf.save(cfg, run_dir / "torchtune_config.yaml")
    (root / "results.json").write_text('{"runs": [{"name": "TAD", "final": {"kl": 1.5, "ppl": 40.0}}]}')
    return run_dir


@pytest.mark.integration_test
def test_demo_student_exports_and_stock_lm_eval_matches_eval_tad(demo_run, demo_cache_dir, tmp_path, capsys):
    from tad_torchtune.demo.smollm2 import load_tokenizer, smollm2

    hf_dir = tmp_path / "hf"
    assert export_main(["--weights", str(demo_run / "epoch_0"), "--out", str(hf_dir)]) == 0
    err = capsys.readouterr().err
    assert "note:" not in err.replace("note: model card: not recorded: steps (--steps), tokens (--tokens)", "")
    card = (hf_dir / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "held-out kl | 1.5" in card

    # same tokenizer: ids of text with ChatML specials, and the special ids
    ours_tok = load_tokenizer(demo_cache_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in ("def f(x):\n    return x + 12345", "<|im_start|>user\nhi<|im_end|>\n", " café 日本"):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours_tok.encode(text), text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (ours_tok.bos_id, ours_tok.eos_id)
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert gen.eos_token_id == [ours_tok.eos_id, ours_tok.endoftext_id]

    # same model: tied embeddings, the llama layout
    from safetensors.torch import load_file

    student = smollm2(num_layers=2, max_seq_len=128)
    student.load_state_dict(load_file(demo_run / "epoch_0" / "m.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.config.tie_word_embeddings and hf.config.num_hidden_layers == 2
    x = torch.tensor([ours_tok.encode("class A:\n    pass")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, student.eval()(x), rtol=0, atol=2e-4)

    stock = _stock_lm_eval(hf_dir, tmp_path / "stock")
    eval_cfg = OmegaConf.create(
        {
            "output_dir": str(tmp_path / "ours"),
            "seed": 1234,
            "device": "cpu",
            "dtype": "fp32",
            "model": {"_component_": "tad_torchtune.demo.smollm2.smollm2", "num_layers": 2, "max_seq_len": 128},
            "checkpointer": {
                "_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
                "checkpoint_dir": str(demo_run / "epoch_0"),
                "checkpoint_files": "auto",
                "model_type": "LLAMA3",
            },
            "tokenizer": {"_component_": "tad_torchtune.demo.smollm2.load_tokenizer", "cache_dir": str(demo_cache_dir)},
            "tasks": ["tiny_offline"],
            "include_defaults": False,
            "batch_size": 8,
            "max_seq_len": 128,
            "max_gen_toks": 8,
            "log_samples": True,
        }
    )
    assert_same_scores(stock, _eval_tad(eval_cfg))
