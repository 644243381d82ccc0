"""The knowledge_distillation_tad recipe trains from a token file and from ORCAMEL-style data (tiny CPU run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune.data import padded_collate_sft

from tad_torchtune.data import orcamel_dataset, packed_token_dataset, write_token_file
from tad_torchtune.data.byte_tokenizer import ByteTokenizer
from tad_torchtune.testing.tiny import STUDENT_KWARGS, write_tiny_assets

REPO_ROOT = Path(__file__).resolve().parents[2]
L = 32


def _run(assets: Path, out: Path, dataset: dict) -> dict[str, float]:
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny_cpu.yaml")
    cfg.assets_dir, cfg.output_dir = str(assets), str(out)
    cfg.dataset = dataset
    cfg.max_steps_per_epoch = 1
    cfg.save_every_n_steps = 1
    recipe = KDTADRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    line = next(iter(sorted((out / "logs").glob("log_*.txt")))).read_text().splitlines()[0]
    return {k: float(v) for k, v in (kv.split(":", 1) for kv in re.match(r"Step 1 \| (.*)$", line).group(1).split())}


def _student(assets: Path) -> torch.nn.Module:
    from torchtune.models.qwen2._component_builders import qwen2

    model = qwen2(**STUDENT_KWARGS)
    model.load_state_dict(torch.load(assets / "student" / "model.pt", weights_only=True))
    return model.eval()


@pytest.mark.integration_test
def test_recipe_trains_on_packed_windows_without_shifting_labels_again(tmp_path):
    assets = write_tiny_assets(tmp_path / "assets", seed=0)
    tok = ByteTokenizer()
    write_token_file(tmp_path / "tok.bin", tok, assets / "data" / "train.jsonl", num_workers=0, progress=False)
    metrics = _run(assets, tmp_path / "run", {"_component_": "tad_torchtune.data.packed_token_dataset",
                                              "path": str(tmp_path / "tok.bin"), "max_seq_len": L})  # fmt: skip
    # Every position of the 4 windows is a target (a second shift would leave 4 x 31).
    assert metrics["num_tokens"] == 4 * L
    # Step 1's CE equals the initial student's CE on the sampler's first 4 windows with the dataset's labels.
    ds = packed_token_dataset(tok, path=tmp_path / "tok.bin", max_seq_len=L)
    idx = list(StatefulDistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0))[:4]
    tokens = torch.tensor([ds[i]["tokens"] for i in idx])
    labels = torch.tensor([ds[i]["labels"] for i in idx])
    with torch.no_grad():
        ce = F.cross_entropy(_student(assets)(tokens).flatten(0, 1).float(), labels.flatten())
    assert metrics["ce_loss"] == pytest.approx(ce.item(), rel=1e-4)


@pytest.mark.integration_test
def test_recipe_trains_on_orcamel_answers_only(tmp_path):
    assets = write_tiny_assets(tmp_path / "assets", seed=0)
    lines = [json.loads(x)["text"] for x in open(assets / "data" / "train.jsonl")]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": t, "answer": " ".join(reversed(t.split()))}) + "\n" for t in lines))
    dataset = {"_component_": "tad_torchtune.data.orcamel_dataset", "orca_source": str(qa), "camel_source": None,
               "max_seq_len": 96}  # fmt: skip
    metrics = _run(assets, tmp_path / "run", dataset)
    # The config's tokenizer has max_seq_len 48: the dataset cuts there too.
    ds = orcamel_dataset(ByteTokenizer(max_seq_len=48), orca_source=qa, camel_source=None, max_seq_len=96)
    assert ds.max_seq_len == 48 and ds.num_truncated > 0
    idx = list(StatefulDistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0))[:4]
    # The recipe shifts unshifted labels once: the trained tokens are exactly the answer tokens + EOS.
    assert metrics["num_tokens"] == sum(sum(lab != -100 for lab in ds[i]["labels"]) for i in idx)
    # ... and step 1's CE is the initial student's CE on those answer tokens after exactly one shift.
    batch = padded_collate_sft([ds[i] for i in idx], padding_idx=ByteTokenizer.pad_id, ignore_idx=-100)
    labels = torch.cat([batch["labels"][:, 1:], torch.full((len(idx), 1), -100)], dim=1)
    with torch.no_grad():
        logits = _student(assets)(batch["tokens"]).flatten(0, 1).float()
    assert metrics["ce_loss"] == pytest.approx(F.cross_entropy(logits, labels.flatten()).item(), rel=1e-4)
