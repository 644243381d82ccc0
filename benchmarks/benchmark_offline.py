"""Benchmark of the offline teacher pass on the demo's teacher (SmolLM2-135M-Instruct) on a CPU.

Tokenises the demo's training text (the Python Language Reference, ``tad_torchtune.demo.text``) into a token
file, builds the teacher from a recipe-style config through :func:`tad_torchtune.offline.models.load_model`
(the path ``tad-tune offline`` takes) and times, per dtype:

- **score** (MiniPLM difference scores): ``--windows`` windows of ``--seq-len`` tokens through the teacher and
  a reference model (the teacher's first ``--ref-layers`` layers: a stand-in for a small reference, ~1/3 of the
  teacher's layer compute), batch ``--batch-size``; tokens/s counts scored tokens (each through both models);
- **generate** (Seq-KD): ``--prompts`` prompts (the first ``--prefix-len`` tokens of windows), greedy, up to
  ``--max-new-tokens`` new tokens each, batched with a KV cache; tokens/s counts generated tokens.

Also the CPU seconds the process used (on a shared machine, tokens per CPU-second depends less on the other
jobs than tokens per wall second) and the bytes written per instance. Results append to ``--out`` (CSV).
Not a test: numbers depend on the machine and on what else runs on it.

    nice -n 15 python benchmarks/benchmark_offline.py --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _teacher_config(folder: Path, seq_len: int):
    from omegaconf import OmegaConf

    from tad_torchtune.demo.smollm2 import SmolLMConfig

    arch = SmolLMConfig()
    return OmegaConf.create(
        {
            "teacher_model": {
                "_component_": "tad_torchtune.demo.smollm2.smollm2",
                "num_layers": arch.num_layers,
                "intermediate_dim": arch.intermediate_dim,
                "max_seq_len": seq_len,
            },
            "teacher_checkpointer": {
                "_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
                "checkpoint_dir": str(folder),
                "checkpoint_files": ["model.safetensors"],
                "model_type": "LLAMA3",
            },
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ref-layers", type=int, default=10)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "offline_cpu.csv"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tad_torchtune.data import write_token_file
    from tad_torchtune.demo.smollm2 import convert, load_tokenizer
    from tad_torchtune.demo.text import reference_documents, split_documents
    from tad_torchtune.offline.engine import WindowSource, run_pass
    from tad_torchtune.offline.miniplm import DifferenceScoreWriter
    from tad_torchtune.offline.models import LoadedModel, load_model
    from tad_torchtune.offline.seqkd import SeqKDWriter, stop_ids_of

    folder = convert()
    tok = load_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tad_offline_bench_") as tmp:
        tmp = Path(tmp)
        train, _ = split_documents(reference_documents())
        with open(tmp / "train.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in train)
        meta = write_token_file(tmp / "train.bin", tok, tmp / "train.jsonl", num_workers=0, progress=False)
        print(f"token file: {meta['num_tokens']} tokens")
        cfg = _teacher_config(folder, args.seq_len + args.max_new_tokens + 1)
        for dtype in args.dtypes:
            teacher = load_model(cfg, device="cpu", dtype=dtype)
            ref_model = copy.deepcopy(teacher.model)
            ref_model.layers = ref_model.layers[: args.ref_layers]
            ref = LoadedModel(ref_model, teacher.fingerprint + f"-first{args.ref_layers}", {"layers": args.ref_layers})

            src = WindowSource(tmp / "train.bin", max_seq_len=args.seq_len, max_windows=args.windows)
            out = tmp / f"score_{dtype}"
            t0, c0 = time.perf_counter(), time.process_time()
            run_pass(src, DifferenceScoreWriter(teacher, ref), out, shard_size=64, batch_size=args.batch_size)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            n_tok = len(src) * args.seq_len
            size = sum(f.stat().st_size for f in out.glob("shard_*"))
            rows.append(
                {
                    "what": "score",
                    "dtype": dtype,
                    "instances": len(src),
                    "tokens": n_tok,
                    "seconds": round(dt, 2),
                    "tokens_per_s": round(n_tok / dt, 1),
                    "cpu_seconds": round(cpu, 2),
                    "tokens_per_cpu_s": round(n_tok / cpu, 1),
                    "bytes_per_instance": round(size / len(src), 1),
                    "detail": f"L={args.seq_len} batch={args.batch_size} teacher 30 layers + reference "
                    f"{args.ref_layers} layers",
                }
            )
            print(rows[-1])

            src = WindowSource(
                tmp / "train.bin", max_seq_len=args.seq_len, max_windows=args.prompts, prefix_len=args.prefix_len
            )
            writer = SeqKDWriter(teacher, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids_of(tok))
            out = tmp / f"gen_{dtype}"
            t0, c0 = time.perf_counter(), time.process_time()
            run_pass(src, writer, out, shard_size=64, batch_size=args.batch_size)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            from tad_torchtune.offline.engine import load_pass

            gen = load_pass(out)
            n_gen = int(gen["lengths"].sum())
            size = sum(f.stat().st_size for f in out.glob("shard_*"))
            rows.append(
                {
                    "what": "generate",
                    "dtype": dtype,
                    "instances": len(src),
                    "tokens": n_gen,
                    "seconds": round(dt, 2),
                    "tokens_per_s": round(n_gen / dt, 1),
                    "cpu_seconds": round(cpu, 2),
                    "tokens_per_cpu_s": round(n_gen / cpu, 1),
                    "bytes_per_instance": round(size / len(src), 1),
                    "detail": f"greedy, prompt {args.prefix_len}, up to {args.max_new_tokens} new "
                    f"(mean {gen['lengths'].mean():.1f}, {int(gen['stopped'].sum())} stopped at EOS), "
                    f"batch={args.batch_size}, KV cache",
                }
            )
            print(rows[-1])
    host = f"{platform.processor() or platform.machine()}; {args.threads} threads; load {os.getloadavg()[0]:.1f}"
    path = Path(args.out)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "host", "date"])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, "host": host, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
