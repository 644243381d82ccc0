"""Loss-stage benchmark: torchtune's chunked KL vs our TADLoss on the same chunks vs the fused linear path.

The *loss stage* is everything after the final norm, forward and backward: output projections of both
models, the divergence, and the gradients for the student's hidden states and output weight.

Providers:
  torchtune  (a) chunked logits (8 chunks, as ``set_num_output_chunks``) + ``ForwardKLWithChunkedOutputLoss``
  tad        (b) the same chunked logits + our ``TADLoss``
  fused      (c) ``FusedLinearTADLoss`` (hidden states + weights; never ``[B, S, V]``), ``chunk_size=--chunk``:
                 one teacher pass when a row (S = B·S / 4) fits in a slice, two when rows are cut
  fused_rows (c) with ``chunk_size = max(--chunk, S)``: whole rows per slice, always one teacher pass
  fused_kl       ``FusedLinearForwardKLLoss`` (vanilla KD on the fused machinery)
  fused_compiled ``FusedLinearTADLoss(compile_chunk=True)`` (compile time excluded: warm-up call first)

Memory, two ways, each in a fresh subprocess per provider:
  peak_mib   ``ru_maxrss`` after one full step minus ``ru_maxrss`` once the inputs exist, with glibc's
             mmap threshold pinned at 1 MiB (``MALLOC_MMAP_THRESHOLD_``): otherwise glibc raises the threshold
             to 32 MiB after the first large free, later [chunk, V] blocks land on the heap and RSS keeps the
             fragmented heap, growing with the number of chunks rather than with live memory.
  live_mib   peak bytes of live tensor memory during one step (torch.profiler's "Total Allocated" over
             its memory events): what CUDA's ``max_memory_allocated`` would report, allocator-independent.
Times (wall ``time_s`` and process CPU ``cpu_s``, all threads: steadier than wall time on a shared machine)
are the median of ``--iters`` steps after one warm-up step (the profiler is off while timing);
providers are interleaved ``--reps`` times and the median over repetitions is reported (the machine is shared).

    python benchmarks/benchmark_fused.py                      # side by side at reduced sizes (CPU)
    python benchmarks/benchmark_fused.py --scaling            # time/memory as V, N and K grow (fused)
    python benchmarks/benchmark_fused.py --worker fused --tokens 512 --vocab 32000 --dim 256   # one point
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROVIDERS = ("torchtune", "tad", "fused", "fused_rows", "fused_kl")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _peak_live_mib(step) -> float:
    """Peak bytes of live CPU tensor memory allocated during ``step()``: the maximum of the profiler's
    "Total Allocated" over its memory events (counted from the profiler's start, so the inputs are excluded)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


def worker(provider: str, tokens: int, vocab: int, dim: int, top_k: int, iters: int, chunk: int) -> dict:
    import torch

    from tad_torchtune.losses import TADLoss
    from tad_torchtune.losses.fused_linear import FusedLinearForwardKLLoss, FusedLinearTADLoss

    torch.manual_seed(0)
    batch = 4 if tokens >= 4 * 64 else 1
    seq = tokens // batch
    hs = torch.randn(batch, seq, dim, requires_grad=True)
    ws = (torch.randn(vocab, dim) / dim**0.5).requires_grad_(True)
    ht = torch.randn(batch, seq, dim)
    wt = torch.randn(vocab, dim) / dim**0.5
    labels = torch.randint(0, vocab, (batch, seq))

    if provider in ("torchtune", "tad"):
        if provider == "torchtune":
            from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

            loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
        else:
            loss_fn = TADLoss(top_k=top_k, num_output_chunks=8)

        def step():
            s_chunks = [torch.nn.functional.linear(c, ws) for c in hs.chunk(8, dim=1)]
            with torch.no_grad():
                t_chunks = [torch.nn.functional.linear(c, wt) for c in ht.chunk(8, dim=1)]
            loss = loss_fn(s_chunks, t_chunks, labels)
            loss.backward()
            return loss
    else:
        if provider == "fused_kl":
            loss_fn = FusedLinearForwardKLLoss(chunk_size=chunk)
        else:
            chunk = max(chunk, seq) if provider == "fused_rows" else chunk
            loss_fn = FusedLinearTADLoss(top_k=top_k, chunk_size=chunk, compile_chunk=provider == "fused_compiled")

        def step():
            loss = loss_fn(hs, ws, ht, wt, labels)
            loss.backward()
            return loss

    base = _rss_mib()
    step()  # warm-up; sets the RSS high-water mark
    peak = _rss_mib() - base
    hs.grad = ws.grad = None
    # Scratch buffers kept between calls (on CPU) are live during the step: free them so the profiled step
    # allocates (and counts) them again.
    if hasattr(getattr(loss_fn, "divergence", loss_fn), "release_workspace"):
        getattr(loss_fn, "divergence", loss_fn).release_workspace()
    live = _peak_live_mib(step)
    times, cpu = [], []
    for _ in range(iters):
        hs.grad = ws.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "provider": provider, "tokens": tokens, "vocab": vocab, "dim": dim, "top_k": top_k, "chunk": chunk,
        "time_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_mib": peak, "live_mib": live,
        "loss": float(loss.detach()), "threads": torch.get_num_threads(), "seq": seq,
        "passes": 2 if provider.startswith("fused") and provider != "fused_kl" and seq > chunk else 1,
    }  # fmt: skip


def _run(provider: str, tokens: int, vocab: int, dim: int, top_k: int, iters: int, chunk: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--tokens", str(tokens),
           "--vocab", str(vocab), "--dim", str(dim), "--top-k", str(top_k), "--iters", str(iters),
           "--chunk", str(chunk)]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def side_by_side(args) -> list[dict]:
    rows = []
    for vocab, tokens in args.sizes:
        dim = args.dim
        runs: dict[str, list[dict]] = {p: [] for p in args.providers}
        for _ in range(args.reps):  # interleave providers, repeat, take medians
            for p in args.providers:
                runs[p].append(_run(p, tokens, vocab, dim, args.top_k, args.iters, args.chunk))
        base = None
        for p in args.providers:
            t = statistics.median(r["time_s"] for r in runs[p])
            c = statistics.median(r["cpu_s"] for r in runs[p])
            m = statistics.median(r["peak_mib"] for r in runs[p])
            live = statistics.median(r["live_mib"] for r in runs[p])
            base = base or (t, m, live, c)
            row = {"vocab": vocab, "dim": dim, "tokens": tokens, "provider": p, "time_s": t, "cpu_s": c,
                   "peak_mib": m, "live_mib": live, "time_vs_a": t / base[0], "cpu_vs_a": c / base[3],
                   "rss_vs_a": m / base[1], "live_vs_a": live / base[2], "passes": runs[p][0]["passes"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def scaling(args) -> list[dict]:
    rows = []
    points = [(v, 512, 10) for v in (8_000, 32_000, 128_000)]
    points += [(32_000, n, 10) for n in (256, 1024)]
    points += [(32_000, 512, k) for k in (1, 50)]
    for vocab, tokens, k in points:
        runs = [_run("fused", tokens, vocab, args.dim, k, args.iters, args.chunk) for _ in range(args.reps)]
        row = {"vocab": vocab, "tokens": tokens, "top_k": k, "time_s": statistics.median(r["time_s"] for r in runs),
               "cpu_s": statistics.median(r["cpu_s"] for r in runs),
               "peak_mib": statistics.median(r["peak_mib"] for r in runs),
               "live_mib": statistics.median(r["live_mib"] for r in runs)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=PROVIDERS + ("fused_compiled",), help="run one measurement, print JSON")
    parser.add_argument("--tokens", type=int, default=1024, help="B·S")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--dim", type=int, default=256, help="hidden size of both models")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=256, help="fused chunk size in tokens")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument(
        "--sizes",
        type=lambda t: tuple(int(x) for x in t.split("x")),
        nargs="+",
        default=[(32_000, 1024), (32_000, 2048), (151_936, 256), (151_936, 512)],
        help="side-by-side points as VOCABxTOKENS (default: 32000x1024 32000x2048 151936x256 151936x512)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.vocab, args.dim, args.top_k, args.iters, args.chunk)))
        return 0
    scaling(args) if args.scaling else side_by_side(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
