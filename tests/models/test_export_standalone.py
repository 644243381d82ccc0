"""Exports that stand alone: a trained tiny student, exported with nothing but its run folder, loads with
``AutoModelForCausalLM`` + ``AutoTokenizer`` and the stock ``lm_eval`` CLI scores it as ``eval_tad`` does."""

from __future__ import annotations

import glob
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

transformers = pytest.importorskip("transformers")

from tad_torchtune.data.byte_tokenizer import ByteTokenizer  # noqa: E402
from tad_torchtune.models import standalone  # noqa: E402
from tad_torchtune.models.export import main as export_main  # noqa: E402
from tad_torchtune.testing.tiny import STUDENT_KWARGS, tiny_config, write_tiny_assets  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY_TASKS = REPO / "tad_torchtune" / "eval" / "tasks" / "tiny_offline"


def _texts() -> list[str]:
    rng = random.Random(0)
    alphabet = "abc xyz\n\t  0123456789 ,.;:!?'\"-_=+()[]{}<>/\\é€日本😀\u00a0"
    out = ["", " ", "hello world", "  two  spaces ", "line\nbreak", "<bos>literal?", "Ġ Ċ"]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    return out


def test_byte_level_hf_tokenizer_gives_byte_tokenizer_ids(tmp_path):
    """The tokenizer.json written for ByteTokenizer encodes and decodes every string as ByteTokenizer does."""
    ours = ByteTokenizer()
    hf_dir = tmp_path / "tok"
    hf_dir.mkdir()
    assert standalone.write_tokenizer(ours, hf_dir) is not None
    standalone.finish_tokenizer_config(hf_dir, 256, 257, 258, 128)
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (256, 257, 258)
    assert len(hf) == ours.vocab_size
    for text in _texts():
        if "<bos>" in text:  # HF recognises special-token names in text; ByteTokenizer sees bytes
            continue
        ids = ours.encode(text, add_bos=False, add_eos=False)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == ours.decode(ids) == text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny TAD run (recipe in process): ``output_dir`` with torchtune_config.yaml, logs, epoch_0."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    root = tmp_path_factory.mktemp("tiny_run")
    assets = write_tiny_assets(root / "assets")
    cfg = tiny_config(assets, root / "run")
    torch.set_num_threads(1)
    recipe = KDTADRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    return root / "run"


def _export(args: list[str], capsys) -> tuple[int, str, str]:
    rc = export_main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _stock_lm_eval(hf_dir: Path, out: Path) -> tuple[dict, dict[str, list]]:
    """``python -m lm_eval --model hf`` exactly as a user runs it; returns (results, samples by task)."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32"]
    cmd += ["--tasks", "tiny_offline", "--include_path", str(TINY_TASKS), "--device", "cpu", "--batch_size", "8"]
    cmd += ["--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (res_path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    samples = {}
    for task in ("tiny_arith_mc", "tiny_arith_gen", "tiny_text_ppl"):
        (path,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples[task] = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return json.loads(Path(res_path).read_text())["results"], samples


def _eval_tad(cfg) -> tuple[dict, dict[str, list]]:
    from tad_torchtune.eval.eval_tad import TADEvalRecipe

    recipe = TADEvalRecipe(cfg)
    recipe.setup(cfg)
    out = recipe.evaluate()
    samples = {}
    for task in ("tiny_arith_mc", "tiny_arith_gen", "tiny_text_ppl"):
        rows = Path(cfg.output_dir, f"samples_{task}.jsonl").read_text().splitlines()
        samples[task] = [json.loads(line) for line in rows]
    return out["results"], samples


def assert_same_scores(stock: tuple[dict, dict], ours: tuple[dict, dict]) -> None:
    """Every metric and every per-request response of the two evaluations agree (log-probs to 1e-5 relative)."""
    (res_a, samp_a), (res_b, samp_b) = stock, ours
    for task in ("tiny_arith_mc", "tiny_arith_gen", "tiny_text_ppl"):
        for key, value in res_b[task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert res_a[task][key] == pytest.approx(value, rel=1e-4), (task, key)
        a = sorted(samp_a[task], key=lambda s: s["doc_id"])
        b = sorted(samp_b[task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) > 0
        for sa, sb in zip(a, b, strict=True):
            if task == "tiny_arith_gen":
                assert sa["resps"] == sb["resps"]  # the same greedy text
                continue
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                lp_a = ra[0][0] if isinstance(ra[0], list) else ra[0]
                lp_b = rb[0][0] if isinstance(rb[0], list) else rb[0]
                # fp32 sums over up to ~100 tokens: HF and torchtune kernels differ in the last bits
                assert float(lp_a) == pytest.approx(float(lp_b), rel=1e-5, abs=1e-4)


@pytest.mark.integration_test
def test_tiny_export_stands_alone_and_stock_lm_eval_matches_eval_tad(tiny_run, tmp_path, capsys):
    # Only the weights and an output folder: architecture, tokenizer and card facts come from the run folder.
    rc, out, err = _export(["--weights", str(tiny_run / "epoch_0"), "--out", str(tmp_path / "hf")], capsys)
    assert rc == 0, err
    hf_dir = tmp_path / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (hf_dir / name).is_file(), name
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (256, 257, 258)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (256, 257, 258)
    card = (hf_dir / "README.md").read_text()
    assert "TADLoss` (top_k=10, beta=2.0)" in card and "| optimizer steps | 4 |" in card
    assert "train.jsonl" in card
    logs = standalone._read_disk_logs(tiny_run / "logs")
    assert f"| training tokens | {int(sum(r['num_tokens'] for r in logs.values())):,} |" in card
    assert "--eval-results" in err  # the one unknown fact is named with its flag

    # transformers loads it: same logits as the torchtune student, same ids as the training tokenizer
    from torchtune.models.qwen2 import qwen2

    student = qwen2(**STUDENT_KWARGS)
    student.load_state_dict(torch.load(tiny_run / "epoch_0" / "model-00001-of-00001.bin", weights_only=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "the teacher predicts the next token"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ByteTokenizer().encode(text, add_bos=False, add_eos=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, student.eval()(x), rtol=0, atol=1e-4)

    # stock lm-eval CLI vs our eval_tad on the same student
    stock = _stock_lm_eval(hf_dir, tmp_path / "stock")
    eval_cfg = OmegaConf.load(REPO / "configs" / "eval_tiny_cpu.yaml")
    eval_cfg.checkpointer.checkpoint_dir = str(tiny_run / "epoch_0")
    eval_cfg.output_dir = str(tmp_path / "ours")
    eval_cfg.log_samples = True
    ours = _eval_tad(eval_cfg)
    assert_same_scores(stock, ours)

    # held-out metrics from eval_tad's results.json go into the card
    rc, _, err = _export(
        ["--weights", str(tiny_run / "epoch_0"), "--out", str(tmp_path / "hf2")]
        + ["--eval-results", str(tmp_path / "ours" / "results.json")],
        capsys,
    )
    assert rc == 0 and "not recorded" not in err
    assert "tiny_arith_mc acc" in (tmp_path / "hf2" / "README.md").read_text()


def test_unknown_pieces_are_named_with_their_flag(tiny_run, tmp_path, capsys):
    weights = tiny_run / "epoch_0"
    # no config anywhere near the weights
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.pt").write_bytes((weights / "model-00001-of-00001.bin").read_bytes())
    rc, _, err = _export(["--weights", str(lone / "model.pt"), "--out", str(tmp_path / "x")], capsys)
    assert rc == 1 and "pass --config" in err

    # a tokenizer that cannot be converted: exported, and told which flag gives it
    cfg = OmegaConf.load(tiny_run / "torchtune_config.yaml")
    cfg.tokenizer = {"_component_": "tad_torchtune.data.byte_tokenizer.ByteTokenizer.__str__"}
    cfg_path = tmp_path / "cfg.yaml"
    OmegaConf.save(cfg, cfg_path)
    rc, _, err = _export(["--config", str(cfg_path), "--weights", str(weights), "--out", str(tmp_path / "y")], capsys)
    assert rc == 0 and "--tokenizer-dir" in err and "--eos-id" in err
    assert not (tmp_path / "y" / "tokenizer.json").exists()

    # ... and with the flags, complete
    tok = tmp_path / "tokfile.json"
    standalone.byte_level_hf_tokenizer().save(str(tok))
    rc, _, err = _export(
        ["--config", str(cfg_path), "--weights", str(weights), "--out", str(tmp_path / "z")]
        + ["--tokenizer-dir", str(tok), "--bos-id", "256", "--eos-id", "257"],
        capsys,
    )
    assert rc == 0 and "--tokenizer-dir" not in err and "--eos-id" not in err
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "z")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (256, 257, 257)


def test_tokenizer_source_dir_finds_hf_folder_of_config_paths(tmp_path):
    hf = tmp_path / "Qwen"
    (hf / "original").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "original/tokenizer.model"):
        (hf / name).write_text("x")
    assert standalone.tokenizer_source_dir({"_component_": "q", "path": str(hf / "vocab.json")}) == hf
    assert standalone.tokenizer_source_dir({"path": str(hf / "original" / "tokenizer.model")}) == hf
    assert standalone.tokenizer_source_dir({"path": str(tmp_path / "missing.model"), "max_seq_len": 8}) is None


def test_weights_that_are_views_of_one_buffer_export(tmp_path):
    """A state dict whose tensors share one storage (as a 2-process run's final checkpoint loads) exports."""
    from torchtune.models.qwen2 import qwen2

    from tad_torchtune.models.export import export_hf, load_weights

    model = qwen2(**STUDENT_KWARGS)
    sd = {k: v for k, v in model.state_dict().items() if "rope" not in k}
    flat = torch.cat([v.flatten() for v in sd.values()])
    views, at = {}, 0
    for k, v in sd.items():
        views[k] = flat[at : at + v.numel()].view(v.shape)
        at += v.numel()
    torch.save(views, tmp_path / "model.pt")
    loaded = load_weights(tmp_path / "model.pt")
    assert loaded["tok_embeddings.weight"].untyped_storage().nbytes() > loaded["tok_embeddings.weight"].nbytes
    out = export_hf(loaded, "qwen2", STUDENT_KWARGS, tmp_path / "hf", tokenizer=ByteTokenizer())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), rtol=0, atol=1e-4)


def test_run_facts_without_disk_logs_take_steps_from_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "epoch_0").mkdir(parents=True)
    (run / "checkpoints" / "step_0000007").mkdir(parents=True)
    (run / "checkpoints" / "step_0000003").mkdir()
    (run / "torchtune_config.yaml").write_text("output_dir: x\n")
    facts = standalone.run_facts({"teacher_model": {"_component_": "torchtune.models.qwen2.qwen2", **STUDENT_KWARGS}},
                                 run / "epoch_0")  # fmt: skip
    assert facts["steps"] == 7 and facts["tokens"] is None
    assert "(qwen2, 2 layers, dim 64)" in facts["teacher"]
    assert facts["loss"] == "1.0 x cross-entropy"  # no kd_loss in this config: CE only
    assert standalone.unknown_facts(facts) == ["data (--data)", "tokens (--tokens)", "heldout (--eval-results)"]


def test_run_facts_read_the_loss_weights_as_the_run_did():
    """The card printed kd_weight's and ce_weight's defaults (1.0 x each) for a kd_ratio config."""
    kd = {"_component_": "tad_torchtune.TADLoss", "top_k": 10, "beta": 2.0}
    facts = standalone.run_facts({"kd_loss": kd, "kd_ratio": 0.25}, None)
    assert facts["loss"] == "0.25 x `tad_torchtune.TADLoss` (top_k=10, beta=2.0) + 0.75 x cross-entropy"


@pytest.mark.integration_test
def test_recipe_hf_output_completed_by_export_hf(tmp_path, capsys):
    """HF in, HF out (torchtune's HF checkpointer writes weights + config.json); export-hf on that epoch folder
    adds the tokenizer, ids and card, and keeps the weights."""
    from tad_torchtune.models.export import export_hf
    from tests.recipes.conftest import run_in_process

    assets = write_tiny_assets(tmp_path / "assets")
    kw = STUDENT_KWARGS
    hf_in = export_hf(torch.load(assets / "student/model.pt", weights_only=True), "qwen2", kw, tmp_path / "in")
    out = tmp_path / "out"
    cfg = tiny_config(assets, out, max_steps_per_epoch=2)
    cfg.checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(hf_in),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "QWEN2",
        "output_dir": str(out),
    }
    torch.set_num_threads(1)
    run_in_process(cfg)
    epoch = next(p for p in out.glob("epoch_*") if p.is_dir())
    rc, _, err = _export(["--weights", str(epoch), "--out", str(tmp_path / "hf")], capsys)
    assert rc == 0, err
    a = transformers.AutoModelForCausalLM.from_pretrained(epoch).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    x = torch.tensor([tok("the student learns", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(b(x).logits, a(x).logits, rtol=0, atol=0)
    assert (b.config.eos_token_id, b.config.bos_token_id) == (257, 256)
