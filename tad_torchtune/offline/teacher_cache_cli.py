"""``tad-tune teacher-cache``: run a config's teacher once over its dataset and write a sparse teacher cache.

The cache is keyed by the item indices of the dataset the recipe builds from the same config
(``tad_torchtune.recipes.kd_tad.build_dataset``); train from it with ``teacher_cache=DIR`` on the same config.
Written by the shared offline pass (``tad_torchtune.offline.engine.run_pass``): fixed shards, atomic files,
exact resume, and under ``torchrun`` each process writes its own shards. See ``docs/teacher_cache.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tad-tune teacher-cache",
        description="Run the teacher of a knowledge_distillation_tad config once over its dataset and write, per "
        "position, its top-K_max ids and log-probs, the tail's log mass and sum of p log p, and M ids drawn from the "
        "renormalised tail (docs/teacher_cache.md). Train with the same config plus teacher_cache=OUT.",
    )
    p.add_argument("--config", required=True, help="recipe config (file or shipped name)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for tad-tune run")
    p.add_argument("--out", required=True, help="cache folder (an interrupted write with the same settings resumes)")
    p.add_argument("--k-max", type=int, default=64, help="ids kept exactly per position, >= kd_loss.top_k (64)")
    p.add_argument("--samples", type=int, default=8, help="ids drawn per position from the tail beyond k-max (8)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws (default: the config's seed, else 0)")
    p.add_argument("--logprob-dtype", choices=("fp32", "bf16"), default="fp32", help="top log-probs storage (fp32)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None, help="teacher dtype (config's dtype)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK if any, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="items per teacher forward (8)")
    p.add_argument("--shard-size", type=int, default=1024, help="items per shard file (1024)")
    p.add_argument("--overwrite", action="store_true", help="start again in a folder that holds another pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch
    from torchtune import config

    from tad_torchtune.check_tools import model_vocab
    from tad_torchtune.config_loader import load_config
    from tad_torchtune.offline.engine import run_pass
    from tad_torchtune.offline.models import load_model, logits_of
    from tad_torchtune.offline.teacher_cache import DatasetSource, SparseTeacherWriter, bytes_per_position
    from tad_torchtune.recipes.kd_tad import build_dataset

    cfg = load_config(args.config, args.overrides)
    for key in ("teacher_model", "teacher_checkpointer", "dataset", "tokenizer", "model"):
        if cfg.get(key) is None:
            raise ValueError(f"the config has no {key}; teacher-cache needs the recipe's teacher, student and data")
    if args.k_max < 1 or args.samples < 0:
        raise ValueError(f"--k-max must be >= 1 and --samples >= 0, got {args.k_max} and {args.samples}")
    with torch.device("meta"):
        vocab = model_vocab(config.instantiate(cfg.model))
    if vocab is None:
        raise ValueError("cannot read the student's vocabulary size (model.tok_embeddings) from the config")
    k_max, samples = args.k_max, args.samples
    if k_max >= vocab:
        k_max, samples = vocab, 0
        log.warning(f"--k-max >= V={vocab}: every id is kept exactly, nothing is sampled")
    elif samples < 1:
        raise ValueError(f"--samples must be >= 1 when --k-max={k_max} < V={vocab} (the tail needs draws)")
    kd = config.instantiate(cfg.kd_loss) if cfg.get("kd_loss") is not None else None
    top_k = getattr(kd, "top_k", None)
    if isinstance(top_k, int) and top_k > k_max:
        raise ValueError(f"kd_loss.top_k={top_k} > --k-max={k_max}: the run could not read this cache")
    datasets = cfg.dataset if hasattr(cfg.dataset, "__len__") and not hasattr(cfg.dataset, "keys") else [cfg.dataset]
    if any(bool(d.get("packed", False)) for d in datasets):
        raise ValueError(
            "dataset.packed: true is not supported by teacher-cache (the pass feeds plain token rows, not the "
            "packed block masks); use an unpacked dataset or a token file (tad_torchtune.data.packed_token_dataset)"
        )
    seed = args.seed if args.seed is not None else (cfg.get("seed") if isinstance(cfg.get("seed"), int) else 0)
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset, _, _ = build_dataset(cfg.dataset, tokenizer)
    teacher = load_model(cfg, device=args.device, dtype=args.dtype or str(cfg.get("dtype", "fp32")))
    writer = SparseTeacherWriter(
        lambda tokens: logits_of(teacher.model, tokens),
        teacher.identity(),
        vocab_size=vocab,
        k_max=k_max,
        samples=samples,
        seed=int(seed),
        temperature=float(getattr(kd, "temperature", 1.0)),
        logprob_dtype=args.logprob_dtype,
    )
    t0 = time.perf_counter()
    manifest = run_pass(
        DatasetSource(dataset),
        writer,
        Path(args.out),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=next(teacher.model.parameters()).device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    size = sum(p.stat().st_size for p in Path(args.out).glob("shard_*.safetensors"))
    state = "complete" if manifest["complete"] else "this process's shards written (others still running)"
    print(
        f"teacher cache {args.out}: {len(dataset)} items, {size / 2**20:.1f} MiB on disk, "
        f"{bytes_per_position(vocab, k_max, samples, args.logprob_dtype)} B/position (K_max={k_max}, M={samples}, "
        f"V={vocab}); {time.perf_counter() - t0:.1f} s; {state}. Train with teacher_cache={args.out}"
    )
    return 0
