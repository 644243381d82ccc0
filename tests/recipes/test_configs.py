"""Shipped recipe configs: the T1 config builds the paper's models (on meta) and the documented batch."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torchtune import config

from tad_torchtune import TADLoss
from tad_torchtune._registry import KD_RECIPE, our_recipes
from tests.recipes.conftest import REPO_ROOT

T1 = REPO_ROOT / "configs" / "qwen1.5_1.8b_to_1.2b.yaml"


def test_t1_config_builds_paper_models():
    cfg = OmegaConf.load(T1)
    with torch.device("meta"):
        student, teacher = config.instantiate(cfg.model), config.instantiate(cfg.teacher_model)
    # Table 8: 1.2B student (D=1536, 24 layers) from Qwen1.5-1.8B; one shared 151,936-token vocabulary.
    assert len(student.layers) == 24 and student.tok_embeddings.weight.shape == (151936, 1536)
    assert teacher.tok_embeddings.weight.shape == (151936, 2048)
    assert 1.1e9 < sum(p.numel() for p in student.parameters()) < 1.25e9
    kd = config.instantiate(cfg.kd_loss)
    assert isinstance(kd, TADLoss) and kd.top_k == 10 and kd.beta == 2.0
    assert cfg.batch_size * cfg.gradient_accumulation_steps == 128  # sequences per step on one GPU
    assert cfg.dataset.max_seq_len == 2048 and cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.1
    assert cfg.ce_weight == 1.0 and cfg.kd_weight == 1.0


def test_registry_lists_recipe_and_configs():
    recipe = next(r for r in our_recipes() if r.name == KD_RECIPE)
    names = {c.name for c in recipe.configs}
    assert {"tiny_cpu", "qwen1.5_1.8b_to_1.2b"} <= names
    assert recipe.file_path.endswith("tad_torchtune/recipes/kd_tad.py") and recipe.supports_distributed
