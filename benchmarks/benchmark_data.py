"""Benchmark of the data pipeline: tokenisation throughput, peak memory vs corpus size, time to first batch.

Builds JSONL corpora of a few sizes in a temporary folder by repeating real text (Pride and Prejudice,
WikiText-2, MATH solutions from ``../shared/assets/text``), tokenises each with ``write_token_file``
(``num_workers`` processes) in a fresh subprocess while a sampler thread records the summed RSS of the
process and its workers, then times ``packed_token_dataset`` + torchdata ``StatefulDataLoader`` to the first
``[batch, max_seq_len]`` batch on the largest file. Nothing is committed but the CSV of results.

    python benchmarks/benchmark_data.py --sizes-mb 20 200 --num-workers 2
    python benchmarks/benchmark_data.py --tokenizer hf-phi3 --sizes-mb 20

Not a test; the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TAD_SHARED_ASSETS", REPO.parent / "shared" / "assets"))
TOKENIZERS = {
    # name -> (builder spec for load_tokenizer, kwargs)
    "llama2": ("torchtune.models.llama2.llama2_tokenizer", {"path": "tokenizers/llama2/tokenizer.model"}),
    "hf-phi3": ("tokenizers/phi3/phi-3-mini", {}),
}


def make_corpus(path: Path, size_mb: float, doc_chars: int = 4000) -> tuple[int, int]:
    """Write ``size_mb`` MB of JSONL documents (``text``) cut from real text, each with a unique header."""
    sources = [
        (ASSETS / "text/gutenberg/pride_and_prejudice_pg1342.txt").read_text(encoding="utf-8"),
        (ASSETS / "text/wikitext2/valid.txt").read_text(encoding="utf-8"),
    ]
    math = [json.loads(line) for line in open(ASSETS / "text/math/math_test_5000.jsonl")]
    sources.append("\n\n".join(f"{r.get('problem', '')}\n{r.get('solution', '')}" for r in math))
    pieces = [s[i : i + doc_chars] for s in sources for i in range(0, len(s) - doc_chars, doc_chars)]
    target = int(size_mb * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            piece = pieces[docs % len(pieces)]
            line = json.dumps({"text": f"Document {docs}.\n{piece}"}) + "\n"
            f.write(line)
            written += len(line.encode())
            docs += 1
    return written, docs


def _mem_tree(pid: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS of pid and its children, RSS of pid) in bytes.

    Forked workers share the parent's pages (torch, torchtune), which summed RSS counts once per process;
    PSS splits shared pages between their users, so summed PSS is the memory really used.
    """
    import psutil

    proc = psutil.Process(pid)
    info = proc.memory_full_info()
    rss, pss, main = info.rss, info.pss, info.rss
    for child in proc.children(recursive=True):
        try:
            ci = child.memory_full_info()
            rss, pss = rss + ci.rss, pss + ci.pss
        except psutil.Error:
            pass
    return rss, pss, main


def run_child(code: str) -> tuple[dict, list[int]]:
    """Run python ``code`` in a subprocess: (its JSON on the last stdout line, peak [sum RSS, sum PSS, main RSS])."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[:] = [max(a, b) for a, b in zip(peak, _mem_tree(proc.pid), strict=True)]
            except Exception:
                pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak


TOKENIZE_CODE = """
import json, time
t0 = time.perf_counter()
from tad_torchtune.data import load_tokenizer, write_token_file
tok = load_tokenizer({spec!r}, **{kwargs!r})
t1 = time.perf_counter()
meta = write_token_file({out!r}, tok, {src!r}, num_workers={workers}, batch_docs={batch_docs}, progress=False,
                        overwrite=True)
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "tokenize_s": t2 - t1, "num_tokens": meta["num_tokens"],
                  "num_bytes": meta["num_bytes"], "num_documents": meta["num_documents"]}}))
"""

FIRST_BATCH_CODE = """
import json, time
t0 = time.perf_counter()
from functools import partial
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune.data import padded_collate_sft
from tad_torchtune.data import load_tokenizer, packed_token_dataset
tok = load_tokenizer({spec!r}, **{kwargs!r})
t1 = time.perf_counter()
ds = packed_token_dataset(tok, path={out!r}, max_seq_len={seq})
sampler = StatefulDistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
dl = StatefulDataLoader(ds, batch_size={batch}, sampler=sampler, drop_last=True,
                        collate_fn=partial(padded_collate_sft, padding_idx=0, ignore_idx=-100))
it = iter(dl)
batch = next(it)
t2 = time.perf_counter()
n = 0
while n < 20:
    next(it); n += 1
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_batch_s": t2 - t1, "batch_s": (t3 - t2) / n, "windows": len(ds),
                  "shape": list(batch["tokens"].shape)}}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[20, 200])
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-docs", type=int, default=256)
    p.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default="llama2")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where corpora and token files go (default: a temp dir, removed)")
    p.add_argument("--csv", default=str(REPO / "benchmarks/results/data_cpu.csv"))
    args = p.parse_args(argv)
    if not ASSETS.is_dir():
        print(f"shared assets not found at {ASSETS}", file=sys.stderr)
        return 1
    spec, kwargs = TOKENIZERS[args.tokenizer]
    spec = str(ASSETS / spec) if "/" in spec else spec
    kwargs = {k: str(ASSETS / v) for k, v in kwargs.items()}
    tmp = tempfile.TemporaryDirectory(prefix="tad_bench_data_") if args.workdir is None else None
    work = Path(tmp.name if tmp else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    common = {"tokenizer": args.tokenizer, "num_workers": args.num_workers, "cpus": os.cpu_count(),
              "git": sha.stdout.strip(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    out = None
    for size in args.sizes_mb:
        src = work / f"corpus_{size:g}mb.jsonl"
        nbytes, ndocs = make_corpus(src, size)
        out = work / f"corpus_{size:g}mb.bin"
        code = TOKENIZE_CODE.format(spec=spec, kwargs=kwargs, out=str(out), src=str(src), workers=args.num_workers,
                                    batch_docs=args.batch_docs)  # fmt: skip
        res, (peak_rss, peak_pss, peak_main) = run_child(code)
        mbps = res["num_bytes"] / 1e6 / res["tokenize_s"]
        row = {**common, "corpus_mb": round(nbytes / 1e6, 1), "documents": res["num_documents"],
               "tokens": res["num_tokens"], "tokenize_s": round(res["tokenize_s"], 2), "text_mb_per_s": round(mbps, 2),
               "tokens_per_s": round(res["num_tokens"] / res["tokenize_s"]),
               "peak_rss_sum_mb": round(peak_rss / 2**20), "peak_pss_sum_mb": round(peak_pss / 2**20),
               "peak_rss_main_mb": round(peak_main / 2**20),
               "import_s": round(res["import_s"], 2)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        src.unlink()
    assert out is not None
    code = FIRST_BATCH_CODE.format(spec=spec, kwargs=kwargs, out=str(out), seq=args.max_seq_len, batch=args.batch_size)
    res, (peak_rss, peak_pss, _) = run_child(code)
    fb = {**common, "file_tokens": rows[-1]["tokens"], "windows": res["windows"], "batch_shape": res["shape"],
          "first_batch_s": round(res["first_batch_s"], 4), "next_batch_ms": round(1000 * res["batch_s"], 2),
          "import_s": round(res["import_s"], 2), "peak_rss_sum_mb": round(peak_rss / 2**20),
          "peak_pss_sum_mb": round(peak_pss / 2**20)}  # fmt: skip
    print(json.dumps(fb), flush=True)
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    keys = ["timestamp", "git", "kind", "tokenizer", "num_workers", "cpus", "corpus_mb", "documents", "tokens",
            "tokenize_s", "text_mb_per_s", "tokens_per_s", "peak_rss_sum_mb", "peak_pss_sum_mb", "peak_rss_main_mb",
            "import_s",
            "first_batch_s", "next_batch_ms", "batch_shape"]  # fmt: skip
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, "kind": "tokenize"})
        w.writerow({**fb, "kind": "first_batch", "tokens": fb["file_tokens"]})
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
