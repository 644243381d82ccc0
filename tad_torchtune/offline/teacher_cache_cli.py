"""``tad-tune teacher-cache``: run a config's teacher once over its dataset and write a sparse teacher cache.

The cache is keyed by the indices of the dataset the recipe builds from the same config
(``tad_torchtune.recipes.kd_tad.build_dataset``); train from it with ``teacher_cache=DIR`` on the same config.
See ``docs/teacher_cache.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tad_torchtune.offline.teacher_cache import bytes_per_position, model_hash, write_teacher_cache

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tad-tune teacher-cache",
        description="Run the teacher of a knowledge_distillation_tad config once over its dataset and write, per "
        "position, its top-K_max ids and log-probs, the tail's log mass and Σp log p, and M ids drawn from the "
        "renormalised tail (docs/teacher_cache.md). Train with the same config plus teacher_cache=OUT.",
    )
    p.add_argument("--config", required=True, help="recipe config (file or shipped name)")
    p.add_argument("--out", required=True, help="cache directory (an interrupted write with the same settings resumes)")
    p.add_argument("--k-max", type=int, default=64, help="ids kept exactly per position (>= the kd_loss top_k)")
    p.add_argument("--samples", type=int, default=8, help="ids drawn per position from the tail beyond k-max")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws (default: the config's seed, else 0)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per teacher forward (default: batch_size)")
    p.add_argument("--sequences-per-shard", type=int, default=256, help="sequences per shard file")
    p.add_argument("--logprob-dtype", choices=("fp32", "bf16"), default="fp32", help="storage of the top log-probs")
    p.add_argument("--device", default=None, help="default: the config's device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for tad-tune run")
    return p


def _teacher(cfg: Any, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The config's teacher, loaded as the recipe loads it (one process), and its :func:`model_hash`."""
    from torchtune import config, training

    sd = config.instantiate(cfg.teacher_checkpointer, resume_from_checkpoint=False).load_checkpoint()[
        training.MODEL_KEY
    ]
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.teacher_model)
    model.load_state_dict(sd, strict=True)
    model.eval().requires_grad_(False)
    return model, model_hash(sd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from torchtune import config, training, utils
    from torchtune.config._utils import _get_component_from_path
    from torchtune.data import padded_collate_packed

    from tad_torchtune.recipes.kd_tad import build_dataset
    from tad_torchtune.validate import _vocab, load_config

    cfg = load_config(args.config, args.overrides)
    for key in ("teacher_model", "teacher_checkpointer", "dataset", "tokenizer", "model"):
        if cfg.get(key) is None:
            raise ValueError(f"the config has no {key}; teacher-cache needs the recipe's teacher, student and data")
    if args.k_max < 1 or args.samples < 0:
        raise ValueError(f"--k-max must be >= 1 and --samples >= 0, got {args.k_max} and {args.samples}")
    out = Path(args.out)
    device = utils.get_device(device=args.device or str(cfg.get("device", "cpu")))
    with torch.device("meta"):
        vocab = _vocab(config.instantiate(cfg.model))
    if vocab is None:
        raise ValueError("cannot read the student's vocabulary size (model.tok_embeddings) from the config")
    k_max = args.k_max
    if k_max >= vocab:
        k_max, samples = vocab, 0
        log.warning(f"--k-max >= V={vocab}: every id is kept exactly, nothing is sampled")
    else:
        samples = args.samples
        if samples < 1:
            raise ValueError(f"--samples must be >= 1 when --k-max={k_max} < V={vocab} (the tail needs draws)")
    kd = config.instantiate(cfg.kd_loss) if cfg.get("kd_loss") is not None else None
    temperature = float(getattr(kd, "temperature", 1.0))
    top_k = getattr(kd, "top_k", None)
    if isinstance(top_k, int) and top_k > k_max:
        raise ValueError(f"kd_loss.top_k={top_k} > --k-max={k_max}: the run could not read this cache")
    seed = args.seed if args.seed is not None else (cfg.get("seed") if isinstance(cfg.get("seed"), int) else 0)
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset, packed, _ = build_dataset(cfg.dataset, tokenizer)
    pad_id = getattr(tokenizer, "pad_id", 0)
    collate_fn = cfg.get("collate_fn", "torchtune.data.padded_collate_sft")
    ignore = int(getattr(kd, "ignore_index", -100))
    collate = (
        padded_collate_packed
        if packed
        else partial(_get_component_from_path(collate_fn), padding_idx=pad_id, ignore_idx=ignore)
    )
    teacher, model_id = _teacher(cfg, device)

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
        logits = teacher(batch["tokens"], **kwargs)
        return torch.cat(logits, dim=1) if isinstance(logits, list) else logits

    t0 = time.perf_counter()
    manifest_path = write_teacher_cache(
        forward,
        dataset,
        collate,
        out,
        vocab_size=vocab,
        k_max=k_max,
        samples=samples,
        seed=int(seed),
        temperature=temperature,
        batch_size=int(args.batch_size or cfg.get("batch_size", 8)),
        sequences_per_shard=args.sequences_per_shard,
        logprob_dtype=args.logprob_dtype,
        model_id=model_id,
        device=device,
        progress=not args.no_progress,
    )
    import json

    m = json.loads(manifest_path.read_text())
    seconds = time.perf_counter() - t0
    print(
        f"teacher cache {out}: {m['num_sequences']} sequences, {m['num_positions']} positions, "
        f"{m['bytes'] / 2**20:.1f} MiB ({bytes_per_position(vocab, k_max, samples, args.logprob_dtype)} B/position; "
        f"K_max={k_max}, M={samples}, V={vocab}, tau={temperature}); {seconds:.1f} s this run "
        f"(dtype {training.get_dtype(cfg.get('dtype', 'fp32'), device=device)}). Train with teacher_cache={out}"
    )
    return 0
