"""Recipe throughput: the real ``KDTADRecipe`` vs a plain PyTorch loop doing the same computation.

Configs:
  tiny  ``configs/tiny_cpu.yaml`` (qwen2 teacher 3x64 / student 2x64, byte vocabulary, batch 4, <= 48 tokens)
  mid   qwen2 student 6 layers x 512, vocab 32000; qwen2 teacher 8 layers x 512, vocab 32064; random token
        sequences of 256 (a map-style dataset in this file), batch 2; random weights saved as torchtune
        checkpoints (teacher output weight sharpened x8 as in ``tad_torchtune.testing.tiny``)

For each config, kd_loss TADLoss (K=10, beta=2) and ForwardKLLoss, each with ``fused_loss: auto`` (fused:
hidden states + output weights) and ``fused_loss: false`` (chunked logits), run by:
  recipe  ``KDTADRecipe`` in-process (setup + train); tokens/s = median of ``metrics_history``'s
          ``tokens_per_second_per_gpu`` after the warm-up steps (valid tokens / step time, data loading and
          optimizer step included, logging and checkpointing excluded; no step checkpoints are written).
  plain   a bare loop on the same models/weights/batches: teacher forward under no_grad, student forward,
          CE + the same divergence (the same loss module, or ``fused_distillation_loss`` with the same
          ``FusedLinearDistillationLoss`` the recipe builds), backward, AdamW step. Same dtype (fp32), threads,
          batch size, clip-free on both sides (the recipe still computes the gradient norm it logs).
Each run is its own subprocess (peak RSS = that run's ``VmHWM``); runs are interleaved ``--reps``
times and the median over repetitions is reported.

    python benchmarks/benchmark_recipe.py                       # tiny + mid, 2 reps (~10 min on 2 cores)
    python benchmarks/benchmark_recipe.py --configs tiny --reps 3
    python benchmarks/benchmark_recipe.py --configs mid --kd fkl --fused false --reps 1 --csv /tmp/cell.csv  # one cell
    python benchmarks/benchmark_recipe.py --worker '{"config": "mid", "runner": "recipe", "kd": "tad", "fused": "auto"}'
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "recipe_cpu.csv"

MID_STUDENT = dict(
    vocab_size=32000, num_layers=6, num_heads=8, num_kv_heads=4, embed_dim=512, intermediate_dim=1408, max_seq_len=512
)
MID_TEACHER = dict(
    vocab_size=32064, num_layers=8, num_heads=8, num_kv_heads=4, embed_dim=512, intermediate_dim=1536, max_seq_len=512
)
MID_SEQ_LEN = 256
MID_BATCH = 2
KD_COMPONENTS = {"tad": "tad_torchtune.TADLoss", "fkl": "tad_torchtune.ForwardKLLoss"}


class RandomTokenDataset:
    """``num_samples`` sequences of ``seq_len`` uniform random ids (deterministic per index); unshifted labels."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=g).tolist()
        return {"tokens": ids, "labels": list(ids)}


def random_token_dataset(tokenizer=None, *, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0):
    """YAML builder (``dataset._component_: benchmark_recipe.random_token_dataset``); the tokenizer is unused."""
    return RandomTokenDataset(num_samples, seq_len, vocab_size, seed)


def write_mid_assets(root: Path) -> Path:
    """Random mid-size qwen2 teacher/student as torchtune checkpoints (``model.pt``), like ``training.tiny``."""
    import torch
    from torchtune.models.qwen2._component_builders import qwen2

    torch.manual_seed(0)
    for name, kwargs in (("teacher", MID_TEACHER), ("student", MID_STUDENT)):
        if (root / name / "model.pt").exists():
            continue
        model = qwen2(**kwargs)
        if name == "teacher":
            with torch.no_grad():
                model.output.weight.mul_(8.0)  # a real head and tail, as in training.tiny
        (root / name).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), root / name / "model.pt")
    return root


def build_config(spec: dict, assets: Path, out: Path, steps: int):
    """The recipe config for one run (tiny_cpu.yaml with overrides)."""
    from omegaconf import OmegaConf

    from tad_torchtune.testing.tiny import tiny_config

    over = {
        "kd_loss._component_": KD_COMPONENTS[spec["kd"]],
        "fused_loss": spec["fused"] if spec["fused"] == "auto" else False,
        "max_steps_per_epoch": steps,
        "save_every_n_steps": None,
        "clip_grad_norm": None,
        "shuffle": False,
    }
    cfg = tiny_config(assets, out, **over)
    if spec["kd"] == "fkl":
        for key in ("top_k", "beta"):
            cfg.kd_loss.pop(key)
    if spec["config"] == "mid":
        cfg.model = OmegaConf.create({"_component_": "torchtune.models.qwen2._component_builders.qwen2", **MID_STUDENT})
        cfg.teacher_model = OmegaConf.create(
            {"_component_": "torchtune.models.qwen2._component_builders.qwen2", **MID_TEACHER}
        )
        cfg.dataset = OmegaConf.create(
            {
                "_component_": "benchmark_recipe.random_token_dataset",
                "num_samples": MID_BATCH * (steps + 1),
                "seq_len": MID_SEQ_LEN,
                "vocab_size": MID_STUDENT["vocab_size"],
            }
        )
        cfg.batch_size = MID_BATCH
    else:
        # 64 lines / batch 4 = 16 batches: repeat the corpus path for more steps.
        n_parts = max(1, -(-steps * int(cfg.batch_size) // 64))
        cfg.dataset = OmegaConf.create([OmegaConf.to_container(cfg.dataset)] * n_parts)
    return cfg


def run_recipe(cfg, warmup: int) -> dict:
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    recipe = KDTADRecipe(cfg)
    try:
        recipe.setup(cfg)
        path = "fused" if recipe._fused_loss is not None else "chunked"
        recipe.train()
    finally:
        recipe.cleanup()
    tps = [m["tokens_per_second_per_gpu"] for m in recipe.metrics_history][warmup:]
    return {"tokens_per_s": statistics.median(tps), "steps": len(tps), "path": path}


def run_plain(cfg, warmup: int) -> dict:
    """The same computation without the recipe: no validation, logging, metrics, guards or checkpoints."""
    import torch
    from omegaconf import ListConfig
    from torch.utils.data import ConcatDataset, DataLoader
    from torchtune import config
    from torchtune.data import padded_collate_sft

    from tad_torchtune.losses.fused_linear import FusedLinearDistillationLoss, fused_distillation_loss
    from tad_torchtune.training.loss_path import FUSED_CHUNK_SIZE
    from tad_torchtune.training.outputs import non_empty, use_tensor_split_output

    torch.manual_seed(0)
    tokenizer = config.instantiate(cfg.tokenizer)
    if isinstance(cfg.dataset, ListConfig):
        ds = ConcatDataset([config.instantiate(part, tokenizer) for part in cfg.dataset])
    else:
        ds = config.instantiate(cfg.dataset, tokenizer)
    loader = DataLoader(
        ds,
        batch_size=int(cfg.batch_size),
        shuffle=False,
        drop_last=True,
        collate_fn=lambda b: padded_collate_sft(b, padding_idx=getattr(tokenizer, "pad_id", 0), ignore_idx=-100),
    )
    student = config.instantiate(cfg.model)
    student.load_state_dict(torch.load(Path(cfg.assets_dir) / "student" / "model.pt", weights_only=True))
    teacher = config.instantiate(cfg.teacher_model)
    teacher.load_state_dict(torch.load(Path(cfg.assets_dir) / "teacher" / "model.pt", weights_only=True))
    teacher.eval().requires_grad_(False)
    kd = config.instantiate(cfg.kd_loss)
    chunks = int(cfg.kd_loss.num_output_chunks)
    use_tensor_split_output(student, chunks)
    use_tensor_split_output(teacher, chunks)
    # The slice size the recipe gives a plain divergence on its fused path.
    fused = FusedLinearDistillationLoss(kd, chunk_size=FUSED_CHUNK_SIZE) if cfg.fused_loss == "auto" else None
    opt = torch.optim.AdamW(student.parameters(), lr=float(cfg.optimizer.lr), weight_decay=0.1)
    tps = []
    it = iter(loader)
    for _ in range(int(cfg.max_steps_per_epoch)):
        t0 = time.perf_counter()
        batch = next(it)
        tokens, labels = batch["tokens"], batch["labels"]
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        n = (labels != -100).sum()
        if fused is not None:
            loss = fused_distillation_loss(student, teacher, tokens, labels, fused, kd_weight=1.0, ce_weight=1.0)
        else:
            with torch.no_grad():
                t_logits = non_empty(teacher(tokens))
            s_logits = non_empty(student(tokens))
            lab = labels.split([c.size(1) for c in s_logits], dim=1)
            ce = sum(
                torch.nn.functional.cross_entropy(lg.flatten(0, 1), lb.flatten(), ignore_index=-100, reduction="sum")
                for lg, lb in zip(s_logits, lab, strict=True)
            )
            loss = ce + kd(s_logits, t_logits, labels, normalize=False)
            del t_logits
        (loss / n.clamp_min(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tps.append(float(n) / (time.perf_counter() - t0))
    tps = tps[warmup:]
    return {"tokens_per_s": statistics.median(tps), "steps": len(tps), "path": "fused" if fused else "chunked"}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(spec, Path(spec["assets"]), Path(out), spec["steps"])
        fn = run_recipe if spec["runner"] == "recipe" else run_plain
        res = fn(cfg, spec["warmup"])
    res["peak_rss_mib"] = _vm_hwm_mib()
    return res


def _vm_hwm_mib() -> float:
    """Peak RSS of this process's address space (``VmHWM``). Not ``ru_maxrss``: Linux carries the parent's
    high-water mark over fork + exec, so every child would report at least the driver's RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    p.add_argument("--kd", nargs="+", default=["tad", "fkl"], choices=["tad", "fkl"], help="kd_loss cells to run")
    p.add_argument("--fused", nargs="+", default=["auto", "false"], choices=["auto", "false"], help="fused_loss cells")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the median")
    p.add_argument("--steps-tiny", type=int, default=20)
    p.add_argument("--steps-mid", type=int, default=6)
    p.add_argument("--csv", default=str(RESULTS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench_recipe_"))  # ~0.45 GB of mid checkpoints: removed at the end
    try:
        return _drive(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drive(args: argparse.Namespace, tmp: Path) -> int:
    """Writes the assets, runs every (config, kd, fused, runner) ``--reps`` times, prints and saves the table."""
    assets = {}
    if "tiny" in args.configs:
        from tad_torchtune.testing.tiny import write_tiny_assets

        assets["tiny"] = write_tiny_assets(tmp / "tiny")
    if "mid" in args.configs:
        assets["mid"] = write_mid_assets(tmp / "mid")
    results: dict[tuple, list[dict]] = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(Path(__file__).resolve().parent))
    for rep in range(args.reps):
        for name in args.configs:
            for kd in args.kd:
                for fused in args.fused:
                    for runner in ("recipe", "plain"):
                        spec = dict(
                            config=name, kd=kd, fused=fused, runner=runner, assets=str(assets[name]),
                            steps=args.steps_tiny if name == "tiny" else args.steps_mid,
                            warmup=args.warmup, threads=args.threads,
                        )  # fmt: skip
                        t0 = time.time()
                        proc = subprocess.run(
                            [sys.executable, __file__, "--worker", json.dumps(spec)],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        )  # fmt: skip
                        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                        if proc.returncode != 0 or not line:
                            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                            raise SystemExit(f"run {spec} failed (exit {proc.returncode})")
                        res = json.loads(line[0][7:])
                        results.setdefault((name, kd, fused, runner), []).append(res)
                        print(
                            f"rep {rep} {name:4s} {kd:3s} fused={fused:5s} {runner:6s} path={res['path']:7s} "
                            f"{res['tokens_per_s']:9.0f} tok/s  rss {res['peak_rss_mib']:6.0f} MiB  "
                            f"({time.time() - t0:.0f} s)",
                            flush=True,
                        )

    def med(key, field):
        return statistics.median(r[field] for r in results[key])

    rows = []
    for name in args.configs:
        for kd in args.kd:
            for fused in args.fused:
                rec, pl = (name, kd, fused, "recipe"), (name, kd, fused, "plain")
                rows.append(
                    {
                        "config": name,
                        "kd_loss": kd,
                        "fused_loss": fused,
                        "path": results[rec][0]["path"],
                        "recipe_tok_s": round(med(rec, "tokens_per_s"), 1),
                        "plain_tok_s": round(med(pl, "tokens_per_s"), 1),
                        "recipe_over_plain": round(med(rec, "tokens_per_s") / med(pl, "tokens_per_s"), 3),
                        "recipe_rss_mib": round(med(rec, "peak_rss_mib")),
                        "plain_rss_mib": round(med(pl, "peak_rss_mib")),
                        "tad_over_fkl_recipe": None,
                        "reps": args.reps,
                        "threads": args.threads,
                    }
                )
    for r in rows:
        if r["kd_loss"] == "tad":
            key = (r["config"], r["fused_loss"], "fkl")
            fkl = next((x for x in rows if (x["config"], x["fused_loss"], x["kd_loss"]) == key), None)
            if fkl is not None:  # both kd_loss cells were run
                r["tad_over_fkl_recipe"] = round(r["recipe_tok_s"] / fkl["recipe_tok_s"], 3)
                fkl["tad_over_fkl_recipe"] = ""
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| config | kd_loss | fused_loss (path) | recipe tok/s | plain tok/s | recipe/plain | TAD/FKL (recipe) "
          "| recipe RSS MiB | plain RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['kd_loss']} | {r['fused_loss']} ({r['path']}) | {r['recipe_tok_s']:.0f} | "
            f"{r['plain_tok_s']:.0f} | {r['recipe_over_plain']:.2f} | {r['tad_over_fkl_recipe'] or ''} | "
            f"{r['recipe_rss_mib']} | {r['plain_rss_mib']} |"
        )
    print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
