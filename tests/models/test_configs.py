"""Every shipped distillation config: keys the recipe reads, models built on the meta device, vocabulary pair,
Table 8 student/teacher pairing, paper hyperparameters, and the memory plan on the paper's hardware."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config

from tad_torchtune.models.registry import resolve
from tad_torchtune.models.students import STUDENT_INIT
from tad_torchtune.planning.memory import estimate_memory
from tad_torchtune.validate import validate_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# paper experiments (docs/paper_facts.md §1): config -> (GPUs in the paper, lr, sequences per optimizer step)
PAPER = {
    "qwen1.5_1.8b_to_0.5b": (1, 1e-4, 128),
    "phi2_to_1.1b": (1, 1e-4, 128),
    "qwen2.5_3b_to_1.2b": (1, 1e-4, 128),
    "gemma2_9b_to_2b": (2, 1e-4, 128),
    "phi3_mini_to_tinyllama": (1, 3e-5, 128),
    "phi3_mini_to_tinyllama_owm": (1, 3e-5, 128),
    "phi3_mini_to_tinyllama_orcamel": (1, 1e-5, 32),
    "phi3_14b_to_llama2_7b": (2, 3e-5, 128),
    "phi3_14b_to_llama2_7b_orcamel": (2, 1e-5, 32),
}
# problems a config may have on a machine without the downloaded models and data
_ABSENT = re.compile(r"is not a folder|No such file|NOT_FOUND|not found|does not exist|missing under")


def _distill_configs() -> list[str]:
    names = []
    for p in sorted(CONFIGS.glob("*.yaml")):
        raw = OmegaConf.load(p)
        if "model" in raw and "teacher_model" in raw:
            names.append(p.stem)
    return names


def test_every_paper_experiment_has_a_config():
    assert set(PAPER) <= set(_distill_configs())


@pytest.mark.parametrize("name", _distill_configs())
def test_config_validates_and_models_build_on_meta(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    # the recipe's own start-up checks: keys, components, hyperparameters, models on meta, vocab pair
    problems = [p for p in validate_config(cfg, check_data=False, world_size=1) if not _ABSENT.search(p.message)]
    assert problems == [], "\n".join(map(str, problems))
    with torch.device("meta"):
        student = tt_config.instantiate(cfg.model)
        teacher = tt_config.instantiate(cfg.teacher_model)
    v_s, v_t = student.tok_embeddings.weight.shape[0], teacher.tok_embeddings.weight.shape[0]
    assert v_t >= v_s  # the loss cuts the teacher's extra rows
    # every model node maps to a family, so init-student / export-hf / plan work on it
    for node in (cfg.model, cfg.teacher_model):
        resolve(OmegaConf.to_container(node, resolve=True))


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters_and_memory(name):
    gpus, lr, seqs = PAPER[name]
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert float(cfg.optimizer.lr) == lr and float(cfg.optimizer.weight_decay) == 0.1
    assert cfg.batch_size * cfg.gradient_accumulation_steps * gpus == seqs
    assert cfg.dataset.max_seq_len == 2048 and cfg.kd_loss._component_ == "tad_torchtune.TADLoss"
    assert cfg.kd_loss.beta == 2.0 and cfg.kd_loss.temperature == 1.0
    plan = estimate_memory(cfg, gpus)
    assert plan.fits, plan.table()
    # the header states the estimate
    header = (CONFIGS / f"{name}.yaml").read_text().split("\n\n", 1)[0]
    assert f"about {plan.total_gib:.0f} GiB per GPU on {gpus} x 80 GB" in header


@pytest.mark.parametrize("name", [n for n in [*PAPER, "qwen1.5_1.8b_to_1.2b"] if (CONFIGS / f"{n}.yaml").is_file()])
def test_table8_student_configs_follow_the_paper(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    student = str(cfg.model._component_).rsplit(".", 1)[-1]
    if student not in STUDENT_INIT:  # continued pretraining: a pretrained student, nothing frozen
        assert not list(cfg.get("freeze", None) or []) and float(cfg.get("cosine_weight", 0)) == 0
        return
    teacher, init = STUDENT_INIT[student]
    assert str(cfg.teacher_model._component_).endswith(f".{teacher}")
    assert ("tok_embeddings" in list(cfg.get("freeze", None) or [])) == init["freeze_embeddings"]
    # students that keep the teacher's width add the hidden-state cosine term (Sec. 3.2)
    assert (float(cfg.get("cosine_weight", 0)) > 0) == init["freeze_embeddings"]
    # the student is loaded from the directory `tad-tune init-student` writes by default
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["checkpointer"]["checkpoint_dir"] == "${student_init_dir}"


def test_tokenizers_with_real_assets(shared_assets, tmp_path):
    """With real tokenizer files in place, the configs' tokenizers build and fit their student's vocabulary."""
    tok = shared_assets / "tokenizers"
    links = {
        "qwen": {"vocab.json": tok / "qwen2/vocab.json", "merges.txt": tok / "qwen2/merges.txt"},
        "llama": {"tokenizer.model": tok / "llama2/tokenizer.model"},
        "phi2": {
            "tokenizer.json": tok / "phi2/tokenizer.json",
            "tokenizer_config.json": tok / "phi2/tokenizer_config.json",
        },
    }
    for kind, files in links.items():
        (tmp_path / kind).mkdir()
        for dst, src in files.items():
            (tmp_path / kind / dst).symlink_to(src)
    cases = {
        "qwen1.5_1.8b_to_0.5b": ["teacher_dir=" + str(tmp_path / "qwen")],
        "qwen2.5_3b_to_1.2b": ["teacher_dir=" + str(tmp_path / "qwen")],
        "phi2_to_1.1b": ["teacher_dir=" + str(tmp_path / "phi2")],
        "phi3_mini_to_tinyllama": ["student_dir=" + str(tmp_path / "llama")],
        "phi3_14b_to_llama2_7b": ["student_dir=" + str(tmp_path / "llama")],
    }
    for name, overrides in cases.items():
        cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), OmegaConf.from_dotlist(overrides))
        problems = [p for p in validate_config(cfg, check_data=False, world_size=1) if "checkpoint" not in p.key]
        assert problems == [], (name, [str(p) for p in problems])


# ---- the pairs people distil now (issue 18): config -> (sequences per optimizer step on 1 GPU, lr, epochs)
CURRENT = {
    "qwen3_8b_to_1.7b": (128, 3e-5, 1),
    "qwen3_8b_to_1.7b_orcamel": (32, 1e-5, 3),
    "qwen3_4b_to_0.6b": (128, 3e-5, 1),
    "qwen3_4b_to_0.6b_orcamel": (32, 1e-5, 3),
    "llama3.1_8b_to_llama3.2_1b": (128, 3e-5, 1),
    "qwen2.5_7b_to_1.5b": (128, 3e-5, 1),
    "qwen2.5_7b_to_0.5b": (128, 3e-5, 1),
}
H200_GIB = 140.0  # 141 GB H200: nvidia-smi reports 143,771 MiB


@pytest.mark.parametrize("name", sorted(CURRENT))
def test_current_pairs_hyperparameters_and_memory(name):
    seqs, lr, epochs = CURRENT[name]
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert float(cfg.optimizer.lr) == lr and float(cfg.optimizer.weight_decay) == 0.1 and cfg.epochs == epochs
    assert cfg.batch_size * cfg.gradient_accumulation_steps == seqs
    assert cfg.dataset.max_seq_len == 2048 and cfg.kd_loss._component_ == "tad_torchtune.TADLoss"
    assert cfg.kd_loss.top_k == 5 and cfg.kd_loss.beta == 2.0 and float(cfg.cosine_weight) == 0
    assert not list(cfg.get("freeze", None) or [])  # pretrained students: nothing frozen
    # one H100 and one H200 (the same config); on the H200 twice the micro-batch with half the accumulation
    h100 = estimate_memory(cfg, 1)
    h200 = estimate_memory(cfg, 1, capacity_gib=H200_GIB)
    big = OmegaConf.merge(cfg, {"batch_size": 16, "gradient_accumulation_steps": seqs // 16})
    h200_big = estimate_memory(big, 1, capacity_gib=H200_GIB)
    assert h100.fits and h200.fits and h200_big.fits, (h100.table(), h200_big.table())
    header = (CONFIGS / f"{name}.yaml").read_text().split("\n\n", 1)[0]
    assert f"about {h100.total_gib:.0f} GiB per GPU on 1 x 80 GB (fits)" in header
    assert (
        f"gradient_accumulation_steps={seqs // 16} (same sequences per step) plans about {h200_big.total_gib:.0f}"
        in (header)
    )
    # both models are the published ones (named builders with the HF dims), student no larger than the teacher
    _, s_args = resolve(OmegaConf.to_container(cfg.model, resolve=True))
    _, t_args = resolve(OmegaConf.to_container(cfg.teacher_model, resolve=True))
    assert s_args["vocab_size"] <= t_args["vocab_size"] and s_args["embed_dim"] < t_args["embed_dim"]


def _standin_dirs(cfg, tmp_path, qwen_tokenizer):
    """Tiny stand-ins for the downloaded model folders: a tiny model of each side's family, exported to HF and
    written under the config's own checkpoint file names, plus tokenizer files where we have real ones."""
    from tad_torchtune.models.export import export_hf
    from tad_torchtune.models.registry import component_builder

    tiny = dict(vocab_size=256, num_layers=2, embed_dim=32, intermediate_dim=48, max_seq_len=64)
    overrides, models = [], {}
    for key, ckpt_key, dir_key in (
        ("model", "checkpointer", "student_dir"),
        ("teacher_model", "teacher_checkpointer", "teacher_dir"),
    ):
        family, args = resolve(OmegaConf.to_container(cfg[key], resolve=True))
        args = {**args, **tiny, "num_heads": 4, "num_kv_heads": 2}
        if "head_dim" in args:
            args["head_dim"] = 16
        model = component_builder(family)(**args)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        d = tmp_path / dir_key
        export_hf(model, family, args, d)
        files = OmegaConf.to_container(cfg[ckpt_key].checkpoint_files)
        if isinstance(files, dict):  # {filename_format, max_filename}: write the first shard, empty the rest
            n = int(files["max_filename"])
            files = [files["filename_format"].format(f"{i:05d}", files["max_filename"]) for i in range(1, n + 1)]
        from safetensors.torch import load_file, save_file

        sd = load_file(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file(sd, d / files[0])
        for f in files[1:]:
            save_file({}, d / f)
        for name in ("vocab.json", "merges.txt"):
            (d / name).symlink_to(qwen_tokenizer / name)
        overrides.append(f"{dir_key}={d}")
        models[key] = (model, ckpt_key)
    return overrides, models


@pytest.mark.parametrize("name", sorted(CURRENT))
def test_current_pairs_validate_and_load_with_tiny_standins(name, shared_assets, tmp_path):
    """With stand-in model folders (tiny weights under the config's own file names, real Qwen tokenizer files),
    `tad-tune validate` finds nothing wrong except, for Llama-3, the tokenizer files we cannot ship (one clear
    line each), and the config's checkpointer nodes load the stand-ins into models that match HF's keys."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    overrides, models = _standin_dirs(cfg, tmp_path, shared_assets / "tokenizers/qwen2")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([*overrides, f"output_dir={tmp_path / 'out'}"]))
    problems = validate_config(cfg, check_data=False, world_size=1)
    if name.startswith("llama"):
        assert sorted(p.key for p in problems) == ["teacher_tokenizer.path", "tokenizer.path"], problems
        assert all("does not exist: download the" in p.message for p in problems)
    else:
        assert problems == [], "\n".join(map(str, problems))
    for model, ckpt_key in models.values():
        ck = tt_config.instantiate(cfg[ckpt_key])
        sd = ck.load_checkpoint()["model"]
        ref = {k: v for k, v in model.state_dict().items() if not k.endswith("cache")}
        assert sorted(sd) == sorted(ref)
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_current_pairs_are_listed_by_tad_tune_ls():
    from tad_torchtune._registry import KD_RECIPE, our_recipes

    recipe = next(r for r in our_recipes() if r.name == KD_RECIPE)
    assert set(CURRENT) <= {c.name for c in recipe.configs}
