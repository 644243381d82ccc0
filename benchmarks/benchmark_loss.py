"""Forward+backward time and peak memory of ``TADLoss`` against torchtune's ``ForwardKLWithChunkedOutputLoss``.

Every measurement runs in a fresh subprocess (one provider, one configuration), so allocator caches and
page-cache effects of one provider never help or hurt another, and peak memory is that process's own:

- The inputs (student chunks as leaf tensors needing grad, teacher chunks, labels) are created first, in
  their final dtype, chunk by chunk, exactly as torchtune's chunked output hands them to the loss.
- Then the kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the
  baseline RSS is read (``VmRSS``). Peak memory = ``VmHWM`` after the runs minus that baseline: the loss's
  own working set plus the gradient it returns (both providers return one of the logits' size). Where
  ``clear_refs`` is unavailable we fall back to ``ru_maxrss`` (an upper bound) and say so in the CSV.
- Time: ``loss_fn(student, teacher, labels).backward()`` wall-clock, one warm-up call, then ``--iters``
  timed calls; the table reports the median over all rounds' timed calls.

Providers are interleaved (round 1: A B C, round 2: B C A, ...) so a noisy neighbour on a shared machine
hits all of them alike. Usage (the README's table):

    python benchmarks/benchmark_loss.py --tokens 512 1024 --rounds 2 --iters 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = {
    "tad": "TADLoss (ours, K=10, beta=2)",
    "tt_fkl": "torchtune ForwardKLWithChunkedOutputLoss",
    "fkl": "ForwardKLLoss (ours, true KL)",
}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
BATCH = 2
CHUNKS = 8


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    """One provider, one configuration: prints one JSON line with times (s) and peak memory (MiB)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype])
    seq = args.tokens // BATCH
    sizes = [seq // CHUNKS + (1 if i < seq % CHUNKS else 0) for i in range(CHUNKS)]
    if args.provider == "tt_fkl":
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=CHUNKS)
        sizes = [c.size(1) for c in torch.empty(1, seq, 1).chunk(CHUNKS, dim=1)]  # torchtune's own split
    elif args.provider == "tad":
        from tad_torchtune import TADLoss

        loss_fn = TADLoss(top_k=10, beta=2.0, num_output_chunks=CHUNKS)
    else:
        from tad_torchtune import ForwardKLLoss

        loss_fn = ForwardKLLoss(num_output_chunks=CHUNKS)
    student = [torch.randn(BATCH, n, args.vocab, dtype=dtype).requires_grad_(True) for n in sizes]
    teacher = [torch.randn(BATCH, n, args.vocab, dtype=dtype).mul_(3.0) for n in sizes]
    labels = torch.randint(0, args.vocab, (BATCH, seq))
    labels[:, : seq // 10] = -100  # a prompt: ~10% of the positions are ignored

    exact = _reset_peak()
    base_kib = _status_kib("VmRSS")
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, values = [], []
    for i in range(args.iters + 1):
        for c in student:
            c.grad = None
        start = time.perf_counter()
        loss = loss_fn(student, teacher, labels)
        loss.backward()
        elapsed = time.perf_counter() - start
        values.append(float(loss))
        if i > 0:  # the first call is the warm-up
            times.append(elapsed)
        del loss
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ref_kib = base_kib if exact else base_maxrss
    inputs_mib = sum(c.numel() * c.element_size() for c in student + teacher) / 2**20
    result = {
        "provider": args.provider,
        "vocab": args.vocab,
        "tokens": args.tokens,
        "dtype": args.dtype,
        "times": times,
        "peak_mib": (peak_kib - ref_kib) / 1024,
        "inputs_mib": inputs_mib,
        "loss": values[-1],
        "peak_method": "VmHWM-reset" if exact else "ru_maxrss",
        "threads": torch.get_num_threads(),
    }
    if args.raw_log is not None:  # one line per subprocess, so an interrupted run keeps what it measured
        with open(args.raw_log, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(
        json.dumps(
            {
                "times": times,
                "peak_mib": (peak_kib - ref_kib) / 1024,
                "inputs_mib": inputs_mib,
                "loss": values[-1],
                "peak_method": "VmHWM-reset" if exact else "ru_maxrss",
                "threads": torch.get_num_threads(),
            }
        )
    )


def _spawn(provider: str, vocab: int, tokens: int, dtype: str, iters: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--provider", provider, "--vocab", str(vocab)]
    cmd += ["--tokens", str(tokens), "--dtype", dtype, "--iters", str(iters), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{provider} V={vocab} N={tokens} {dtype} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _estimated_gib(vocab: int, tokens: int, dtype: str) -> float:
    """Rough peak of the heaviest provider (torchtune keeps ~2 fp32 copies of every chunk for backward)."""
    bytes_per = 2 if dtype == "bf16" else 4
    return vocab * tokens * (3 * bytes_per + 9) / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936, 256000])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048], help="B*S per call (B=2)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per provider and configuration")
    parser.add_argument("--iters", type=int, default=2, help="timed calls per subprocess (after one warm-up)")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per worker (1: stable on a shared machine)"
    )
    parser.add_argument("--max-gib", type=float, default=4.0, help="skip configurations estimated above this")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss_cpu.csv")
    parser.add_argument(
        "--raw-log", type=Path, default=Path("/tmp/benchmark_loss_raw.jsonl"), help="per-subprocess JSON lines"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", choices=list(PROVIDERS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.vocab, args.tokens = args.vocab[0], args.tokens[0]
        worker(args)
        return 0

    configs = [
        (v, n, d)
        for v in args.vocab
        for n in args.tokens
        for d in args.dtypes
        if _estimated_gib(v, n, d) <= args.max_gib
    ]
    skipped = [(v, n, d) for v in args.vocab for n in args.tokens for d in args.dtypes if (v, n, d) not in configs]
    results: dict[tuple, dict[str, list]] = {c: {p: [] for p in args.providers} for c in configs}
    for r in range(args.rounds):
        order = args.providers[r % len(args.providers) :] + args.providers[: r % len(args.providers)]
        for cfg in configs:
            for provider in order:
                results[cfg][provider].append(_spawn(provider, *cfg, args.iters, args.threads))
                print(f"round {r + 1}/{args.rounds} V={cfg[0]} N={cfg[1]} {cfg[2]} {provider} done", file=sys.stderr)

    rows = []
    for (vocab, tokens, dtype), by_provider in results.items():
        summary = {}
        for provider, runs in by_provider.items():
            summary[provider] = {
                "time_s": statistics.median(t for run in runs for t in run["times"]),
                "peak_mib": statistics.median(run["peak_mib"] for run in runs),
                "loss": runs[-1]["loss"],
                "inputs_mib": runs[-1]["inputs_mib"],
                "method": runs[-1]["peak_method"],
                "threads": runs[-1]["threads"],
            }
        base = summary.get("tt_fkl")
        for provider, s in summary.items():
            rows.append(
                {
                    "vocab": vocab,
                    "tokens": tokens,
                    "dtype": dtype,
                    "provider": provider,
                    "time_s": round(s["time_s"], 4),
                    "peak_mib": round(s["peak_mib"], 1),
                    "time_ratio_vs_tt_fkl": round(s["time_s"] / base["time_s"], 3) if base else "",
                    "mem_ratio_vs_tt_fkl": round(s["peak_mib"] / base["peak_mib"], 3) if base else "",
                    "inputs_mib": round(s["inputs_mib"], 1),
                    "loss": round(s["loss"], 5),
                    "peak_method": s["method"],
                    "threads": s["threads"],
                    "samples": args.rounds * args.iters,
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    header = f"{'V':>7} {'N':>5} {'dtype':>5} {'provider':>7} {'time s':>8} {'peak MiB':>9} {'t/tt':>6} {'mem/tt':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['vocab']:>7} {row['tokens']:>5} {row['dtype']:>5} {row['provider']:>7} {row['time_s']:>8.3f} "
            f"{row['peak_mib']:>9.1f} {row['time_ratio_vs_tt_fkl']!s:>6} {row['mem_ratio_vs_tt_fkl']!s:>7}"
        )
    if skipped:
        print(f"skipped (estimated > {args.max_gib} GiB): {skipped}")
    print(f"CSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
