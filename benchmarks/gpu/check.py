"""One-call CUDA check and benchmark for a short GPU slot (target: under 8 minutes on one H200).

Parts, most informative first (``--parts`` picks and orders them; each is timed; a failing part is recorded
and the next one runs):

  env          versions, device, measured bf16 matmul peak (the MFU denominator)
  correctness  the loss family against the fp64 reference (``losses/reference.py``) on the device, fp32 and bf16
               logits, chunked and fused, a 4096-position row, a peaked teacher; sync-free hot path
               (``torch.cuda.set_sync_debug_mode("error")`` around TADLoss and the fused loss, forward and
               backward); bitwise-repeatable results under ``torch.use_deterministic_algorithms(True)``
  loss_stage   B=4, S=2048, V=151936, D=2048, bf16: torchtune's ForwardKLWithChunkedOutputLoss, TADLoss on the
               same chunks, fused TAD, fused forward KL: CUDA-event median ms and ``max_memory_allocated``
  recipe       training steps on the T1 pair with random weights (Qwen1.5-1.8B teacher, Table 8 1.2B student),
               S=2048, bf16, activation checkpointing, AdamW: cells of (TAD | forward KL) x (fused | chunked)
               x (compile | eager): tokens/s, MFU vs the measured peak, peak memory vs ``tad-tune plan``,
               host syncs per step counted with ``set_sync_debug_mode("warn")``
  gemma2       Gemma-2 soft-capped, sliding-window attention: flex (compiled) against eager on one layer
               stack (parity), then flex forward+backward time and memory at a long sequence

Everything goes to one folder (``--out``, default ``$OUT`` or ``./gpu_check``): ``check.json`` (rewritten after
every part, so a run cut short keeps what it measured), one CSV per tabular part, ``check.log``.

    python benchmarks/gpu/check.py                      # the whole check on CUDA
    python benchmarks/gpu/check.py --parts correctness loss_stage
    python benchmarks/gpu/check.py --dry-run            # tiny sizes on CPU, < 1 minute (run by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

PARTS = ("env", "correctness", "loss_stage", "recipe", "gemma2")
GIB = 2**30


@dataclass
class Sizes:
    """Problem sizes: the real ones on CUDA, tiny ones for ``--dry-run``."""

    batch: int = 4
    seq: int = 2048
    vocab: int = 151_936
    dim: int = 2048
    long_row: int = 4096
    ref_vocab: int = 4096  # fp64 reference checks: [B, S, V] fp64 with autograd must stay small
    ref_seq: int = 256
    loss_iters: int = 5
    recipe_steps: int = 4  # timed steps after one warm-up step
    gemma_seq: int = 8192
    gemma_parity_seq: int = 1024
    gemma_window: int = 4096
    gemma_parity_window: int = 256
    tiny_models: bool = False


DRY = Sizes(
    batch=2, seq=64, vocab=512, dim=32, long_row=4096, ref_vocab=300, ref_seq=48, loss_iters=2, recipe_steps=1,
    gemma_seq=128, gemma_parity_seq=64, gemma_window=32, gemma_parity_window=16, tiny_models=True,
)  # fmt: skip


class Check:
    """The run's output folder, log and results; ``save()`` rewrites ``check.json`` after each part."""

    def __init__(self, out: Path, device: torch.device, sizes: Sizes, dry_run: bool):
        self.out, self.device, self.sizes, self.dry_run = out, device, sizes, dry_run
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"dry_run": dry_run, "parts": {}}
        self._log = open(out / "check.log", "a")  # noqa: SIM115 (closed in main)
        self.start = time.perf_counter()
        self.deadline: float | None = None  # recipe cells not started after this perf_counter() time
        self.cells: list[str] = []  # recipe cells to run (empty: the default list)

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def save(self) -> None:
        tmp = self.out / "check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.out / "check.json")

    def csv(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(self.out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def time_ms(self, fn: Callable[[], Any], iters: int, warmup: int = 1) -> list[float]:
        """Per-call times in ms: CUDA events on the current stream (no sync inside the timed span), else wall."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times


@contextlib.contextmanager
def sync_debug(check: Check, mode: str):
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (nothing off CUDA); restores the previous mode."""
    if not check.cuda:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


# --------------------------------------------------------------------------------------------------------
def part_env(check: Check) -> dict[str, Any]:
    import importlib

    from tad_torchtune.planning.flops import measure_matmul_peak

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchtune", "torchao", "triton", "transformers", "omegaconf", "tad_torchtune"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # a missing optional package is a result, not a failure
            versions[mod] = f"missing ({type(e).__name__})"
    out: dict[str, Any] = {"versions": versions, "device": str(check.device)}
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        out.update(
            name=props.name,
            memory_gib=props.total_memory / GIB,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    peak = measure_matmul_peak(check.device, size=None if check.cuda else 256, iters=None if check.cuda else 2)
    out["matmul_peak_tflops"] = peak / 1e12
    check.results["matmul_peak_flops"] = peak
    check.log(f"env: {versions} {out.get('name', check.device)}; matmul peak {peak / 1e12:.1f} TFLOP/s")
    return out


# --------------------------------------------------------------------------------------------------------
def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def part_correctness(check: Check) -> dict[str, Any]:
    """Production losses on the device vs the fp64 reference (CPU, autograd); sync-free and deterministic runs."""
    import torch.nn.functional as F

    from tad_torchtune.losses import ForwardKLLoss, JSDLoss, ReverseKLLoss, SymmetricKLLoss, TADLoss, ToDiLoss
    from tad_torchtune.losses import reference as ref
    from tad_torchtune.losses.fused_linear import FusedLinearForwardKLLoss, FusedLinearTADLoss

    s, dev = check.sizes, check.device
    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    b, seq, vocab = 2, s.ref_seq, s.ref_vocab

    def case(name: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
        """Each loss on ``dtype``-rounded logits vs the fp64 reference on the same rounded values."""
        family = [
            ("tad", TADLoss(top_k=10, beta=2.0), lambda st, te, lb: ref.tad_reference(st, te, lb, top_k=10, beta=2.0)),
            ("fkl", ForwardKLLoss(), ref.forward_kl_reference),
            ("rkl", ReverseKLLoss(), ref.reverse_kl_reference),
            ("skl", SymmetricKLLoss(), ref.symmetric_kl_reference),
            ("jsd", JSDLoss(), ref.jsd_reference),
            ("todi", ToDiLoss(), ref.todi_reference),
        ]
        for dtype in (torch.float32, torch.bfloat16):
            st_d = student.to(dev, dtype).requires_grad_(True)
            te_d = teacher.to(dev, dtype)
            lb_d = labels.to(dev)
            st64 = st_d.detach().double().cpu().requires_grad_(True)
            te64 = te_d.double().cpu()
            for loss_name, loss_fn, ref_fn in family:
                loss = loss_fn(st_d, te_d, lb_d)
                (grad,) = torch.autograd.grad(loss, st_d)
                r = ref_fn(st64, te64, labels)
                (r_grad,) = torch.autograd.grad(r, st64)
                err = (grad.double().cpu() - r_grad).abs().max().item() / max(r_grad.abs().max().item(), 1e-30)
                value, reference = float(loss.detach()), float(r)
                rows.append({"case": name, "path": "chunked", "loss": loss_name, "dtype": str(dtype)[6:],
                             "value": value, "reference": reference, "rel_err_value": _rel(value, reference),
                             "rel_err_grad_max": err})  # fmt: skip

    # Random logits; a peaked teacher (top-K holds almost all mass: α_T near 1e-6); ignored positions.
    student = torch.randn(b, seq, vocab, generator=g) * 2
    teacher = torch.randn(b, seq, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (b, seq), generator=g)
    labels[0, : seq // 4] = -100
    case("random", student, teacher, labels)
    peaked = teacher.clone()
    peaked[..., :10] += 25.0
    case("peaked_teacher", student, peaked, labels)

    # Fused vs the same reference: hidden states and weights in fp32 and bf16 (logits formed on the device).
    d = 64
    hs, ws = torch.randn(b, seq, d, generator=g), torch.randn(vocab, d, generator=g) / d**0.5 * 4
    ht, wt = torch.randn(b, seq, d, generator=g), torch.randn(vocab, d, generator=g) / d**0.5 * 4
    for dtype in (torch.float32, torch.bfloat16):
        hs_d, ws_d = hs.to(dev, dtype).requires_grad_(True), ws.to(dev, dtype).requires_grad_(True)
        ht_d, wt_d = ht.to(dev, dtype), wt.to(dev, dtype)
        # The reference sees the logits the model's own output layer would give (formed in the model dtype).
        st64 = F.linear(hs_d.detach(), ws_d.detach()).double().cpu().requires_grad_(True)
        te64 = F.linear(ht_d, wt_d).double().cpu()

        def tad_ref(a, c, lb):
            return ref.tad_reference(a, c, lb, top_k=10)

        for loss_name, fused, ref_fn in (
            ("tad", FusedLinearTADLoss(top_k=10, chunk_size=seq), tad_ref),
            ("tad_two_pass", FusedLinearTADLoss(top_k=10, chunk_size=seq // 3), tad_ref),
            ("fkl", FusedLinearForwardKLLoss(chunk_size=seq), ref.forward_kl_reference),
        ):
            loss = fused(hs_d, ws_d, ht_d, wt_d, labels.to(dev))
            r = ref_fn(st64, te64, labels)
            value, reference = float(loss.detach()), float(r)
            rows.append({"case": "fused", "path": "fused", "loss": loss_name, "dtype": str(dtype)[6:],
                         "value": value, "reference": reference, "rel_err_value": _rel(value, reference)})  # fmt: skip

    # The 4096-position row: w(X) over near-equal α_T, chunked and fused (issue 13 item 11).
    long_s = torch.randn(1, s.long_row, 64, generator=g)
    long_t = torch.randn(1, s.long_row, 64, generator=g) * 0.01
    long_l = torch.randint(0, 64, (1, s.long_row), generator=g)
    p = torch.softmax(long_t.double(), -1)
    w_ref = 2.0 / p.scatter(-1, p.topk(5, -1).indices, 0.0).sum(-1).mean().item()
    r = float(ref.tad_reference(long_s.double(), long_t.double(), long_l, top_k=5))
    eye = torch.eye(64, device=dev)
    for path, fn in (
        ("chunked", TADLoss(top_k=5)),
        ("fused_one_pass", FusedLinearTADLoss(top_k=5, chunk_size=s.long_row)),
        ("fused_two_pass", FusedLinearTADLoss(top_k=5, chunk_size=512)),
    ):
        if path == "chunked":
            loss = fn(long_s.to(dev), long_t.to(dev), long_l.to(dev))
        else:
            loss = fn(long_s.to(dev), eye, long_t.to(dev), eye, long_l.to(dev))
        w = float(fn.last_stats["w_sum"])
        value = float(loss.detach())
        rows.append({"case": f"row_{s.long_row}", "path": path, "loss": "tad", "dtype": "float32", "value": value,
                     "reference": r, "rel_err_value": _rel(value, r), "w": w, "w_reference": w_ref,
                     "rel_err_w": _rel(w, w_ref)})  # fmt: skip
    check.csv("correctness", rows)

    # Sync-free: TADLoss and the fused loss, forward and backward, with CUDA's sync detector set to error.
    sync_free: dict[str, str] = {}
    st = student.to(dev, torch.bfloat16).requires_grad_(True)
    te, lb = teacher.to(dev, torch.bfloat16), labels.to(dev)
    hs_d, ws_d = hs.to(dev, torch.bfloat16).requires_grad_(True), ws.to(dev, torch.bfloat16).requires_grad_(True)
    ht_d, wt_d = ht.to(dev, torch.bfloat16), wt.to(dev, torch.bfloat16)
    one_pass, two_pass = FusedLinearTADLoss(top_k=10, chunk_size=seq), FusedLinearTADLoss(top_k=10, chunk_size=seq // 3)
    for name, run in (
        ("tad_chunked", lambda: TADLoss(top_k=10)(st, te, lb).backward()),
        ("fused_tad", lambda: one_pass(hs_d, ws_d, ht_d, wt_d, lb, ce_weight=1.0).backward()),
        ("fused_tad_two_pass", lambda: two_pass(hs_d, ws_d, ht_d, wt_d, lb).backward()),
    ):
        run()  # warm-up outside the detector (first-call allocations, lazy init)
        check.sync()
        try:
            with sync_debug(check, "error"):
                run()
            sync_free[name] = "ok" if check.cuda else "not checked (no CUDA)"
        except RuntimeError as e:
            sync_free[name] = f"SYNC: {str(e).splitlines()[0][:200]}"

    # Deterministic mode: two runs bitwise equal (and no op refuses to run).
    deterministic: dict[str, Any] = {}
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:

        def grads() -> list[torch.Tensor]:
            out = list(torch.autograd.grad(TADLoss(top_k=10)(st, te, lb), st))
            f = FusedLinearTADLoss(top_k=10, chunk_size=seq // 3)
            out += list(torch.autograd.grad(f(hs_d, ws_d, ht_d, wt_d, lb, ce_weight=1.0), (hs_d, ws_d)))
            return out

        a, c = grads(), grads()
        deterministic["bitwise_equal"] = all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    except RuntimeError as e:
        deterministic["error"] = str(e).splitlines()[0][:300]
    finally:
        torch.use_deterministic_algorithms(before)

    worst = {}
    for r_ in rows:
        key = f"{r_['path']}/{r_['dtype']}"
        worst[key] = max(worst.get(key, 0.0), r_["rel_err_value"])
    long_w = {r_["path"]: r_["rel_err_w"] for r_ in rows if "rel_err_w" in r_}
    check.log(f"correctness: worst rel. value error {worst}; 4096-row w(X) rel. error {long_w}")
    check.log(f"correctness: sync-free {sync_free}; deterministic {deterministic}")
    return {"worst_rel_err_value": worst, "long_row_rel_err_w": long_w, "sync_free": sync_free,
            "deterministic": deterministic, "rows": len(rows)}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
def part_loss_stage(check: Check) -> dict[str, Any]:
    """Everything after the final norm, forward and backward, in bf16 (the recipe's dtype on GPU)."""
    import torch.nn.functional as F
    from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

    from tad_torchtune.losses import TADLoss
    from tad_torchtune.losses.fused_linear import FusedLinearForwardKLLoss, FusedLinearTADLoss

    s, dev = check.sizes, check.device
    dtype = torch.bfloat16 if check.cuda else torch.float32
    torch.manual_seed(0)
    hs = torch.randn(s.batch, s.seq, s.dim, device=dev, dtype=dtype, requires_grad=True)
    ws = (torch.randn(s.vocab, s.dim, device=dev, dtype=dtype) / s.dim**0.5).requires_grad_(True)
    ht = torch.randn(s.batch, s.seq, s.dim, device=dev, dtype=dtype)
    wt = torch.randn(s.vocab, s.dim, device=dev, dtype=dtype) / s.dim**0.5 * 4
    labels = torch.randint(0, s.vocab, (s.batch, s.seq), device=dev)

    def chunked(loss_fn) -> Callable[[], Any]:
        def step():
            s_chunks = [F.linear(c, ws) for c in hs.chunk(8, dim=1)]
            with torch.no_grad():
                t_chunks = [F.linear(c, wt) for c in ht.chunk(8, dim=1)]
            loss_fn(s_chunks, t_chunks, labels).backward()

        return step

    def fused(loss_fn) -> Callable[[], Any]:
        return lambda: loss_fn(hs, ws, ht, wt, labels).backward()

    providers = {
        "torchtune_fkl_chunked": chunked(ForwardKLWithChunkedOutputLoss(num_output_chunks=8)),
        "tad_chunked": chunked(TADLoss(top_k=10, num_output_chunks=8)),
        "fused_tad": fused(FusedLinearTADLoss(top_k=10, chunk_size=max(s.seq, 2048))),
        "fused_fkl": fused(FusedLinearForwardKLLoss(chunk_size=max(s.seq, 2048))),
        "fused_tad_chunk1024": fused(FusedLinearTADLoss(top_k=10, chunk_size=1024 if check.cuda else s.seq // 2)),
    }
    rows = []
    for name, step in providers.items():
        hs.grad = ws.grad = None
        check.reset_peak()
        base = torch.cuda.memory_allocated(dev) / GIB if check.cuda else None
        try:
            times = check.time_ms(step, s.loss_iters)
        except torch.OutOfMemoryError as e:
            rows.append({"provider": name, "error": f"OOM: {str(e).splitlines()[0][:160]}"})
            hs.grad = ws.grad = None
            continue
        peak = check.peak_gib()
        rows.append({"provider": name, "median_ms": statistics.median(times), "min_ms": min(times),
                     "peak_gib": peak, "peak_above_inputs_gib": None if peak is None else peak - base})  # fmt: skip
        check.log(f"loss_stage {name}: {rows[-1]}")
        check.csv("loss_stage", rows)
    ref = next((r for r in rows if r["provider"] == "torchtune_fkl_chunked" and "median_ms" in r), None)
    if ref:
        for r in rows:
            if "median_ms" in r:
                r["time_vs_torchtune"] = r["median_ms"] / ref["median_ms"]
                if ref["peak_above_inputs_gib"]:
                    r["memory_vs_torchtune"] = r["peak_above_inputs_gib"] / ref["peak_above_inputs_gib"]
    check.csv("loss_stage", rows)
    return {"sizes": dict(B=s.batch, S=s.seq, V=s.vocab, D=s.dim, dtype=str(dtype)), "rows": rows}


# --------------------------------------------------------------------------------------------------------
def _t1_models(check: Check, dtype: torch.dtype):
    """T1 pair (or a tiny qwen2 pair for the dry run) with random weights, built on the device."""
    from torchtune.models.qwen2._component_builders import qwen2

    s = check.sizes
    if s.tiny_models:
        kw = dict(vocab_size=s.vocab, num_heads=4, num_kv_heads=2, embed_dim=s.dim, max_seq_len=s.seq)
        node_t = dict(_component_=f"{qwen2.__module__}.qwen2", num_layers=3, intermediate_dim=96, **kw)
        node_s = dict(_component_=f"{qwen2.__module__}.qwen2", num_layers=2, intermediate_dim=64, **kw)
    else:
        node_t = dict(_component_="tad_torchtune.models.qwen1_5_1_8b", max_seq_len=s.seq)
        node_s = dict(_component_="tad_torchtune.models.students.qwen1_5_student_1_2b", max_seq_len=s.seq)
    return node_t, node_s


def _build(node: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune import training

    with training.set_default_dtype(dtype), device:
        return tt_config.instantiate(OmegaConf.create(node))


def _train_step(student, teacher, kd, fused, opt, s: Sizes, dev: torch.device) -> Callable[[], None]:
    """One optimizer step as the recipe takes it: fused helper or chunked logits + CE + divergence, AdamW."""
    from tad_torchtune.losses.fused_linear import fused_distillation_loss
    from tad_torchtune.training.outputs import non_empty

    gen = torch.Generator(device=dev).manual_seed(1)

    def step() -> None:
        tokens = torch.randint(0, s.vocab, (s.batch, s.seq), device=dev, generator=gen)
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
        n = (labels != -100).sum()
        if fused is not None:
            loss = fused_distillation_loss(student, teacher, tokens, labels, fused, kd_weight=1.0, ce_weight=1.0)
        else:
            with torch.no_grad():
                t_logits = non_empty(teacher(tokens))
            s_logits = non_empty(student(tokens))
            lab = labels.split([c.size(1) for c in s_logits], dim=1)
            ce = sum(
                torch.nn.functional.cross_entropy(
                    lg.float().flatten(0, 1), lb.flatten(), ignore_index=-100, reduction="sum"
                )
                for lg, lb in zip(s_logits, lab, strict=True)
            )
            loss = ce + kd(s_logits, t_logits, labels, normalize=False)
            del t_logits, s_logits
        (loss / n.clamp_min(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def part_recipe(check: Check) -> dict[str, Any]:
    """Training steps as the recipe takes them (same loss modules, fused helper, AC, compile, fused AdamW)."""
    from omegaconf import OmegaConf
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer

    from tad_torchtune.losses import ForwardKLLoss, TADLoss
    from tad_torchtune.losses.fused_linear import FusedLinearDistillationLoss
    from tad_torchtune.planning.flops import estimate_flops_per_token, measure_matmul_peak
    from tad_torchtune.planning.memory import estimate_memory
    from tad_torchtune.training.outputs import use_tensor_split_output

    s, dev = check.sizes, check.device
    dtype = torch.bfloat16 if check.cuda else torch.float32
    node_t, node_s = _t1_models(check, dtype)
    peak = check.results.get("matmul_peak_flops") or measure_matmul_peak(dev, size=None if check.cuda else 256)
    plan_cfg = OmegaConf.create({"model": node_s, "teacher_model": node_t, "dtype": "bf16" if check.cuda else "fp32",
                                 "batch_size": s.batch, "enable_activation_checkpointing": True,
                                 "kd_loss": {"num_output_chunks": 8}, "max_seq_len": s.seq})  # fmt: skip
    plan = estimate_memory(plan_cfg, capacity_gib=80.0)
    plan_gib = plan.total_gib
    check.log(f"recipe: plan (chunked-logits estimate) {plan_gib:.1f} GiB\n{plan.table()}")

    cells = [  # (kd, fused, compile), most informative first; compiled cells last (they compile the teacher too)
        ("tad", True, False), ("fkl", True, False), ("tad", False, False),
        ("fkl", False, False), ("tad", True, True), ("fkl", True, True),
    ]  # fmt: skip
    names = {c: f"{c[0]}_{'fused' if c[1] else 'chunked'}_{'compile' if c[2] else 'eager'}" for c in cells}
    if check.cells:
        unknown = set(check.cells) - set(names.values())
        if unknown:
            raise ValueError(f"unknown recipe cell(s) {sorted(unknown)}; choose from {sorted(names.values())}")
        cells = [c for c in cells if names[c] in check.cells]
    elif check.dry_run:
        cells = cells[:3]  # compile takes minutes on a small CPU: --cells tad_fused_compile runs it
    rows = []
    teacher = _build(node_t, dev, dtype).eval().requires_grad_(False)
    teacher_compiled = False
    flops_cfg = {k: v for k, v in node_s.items()}
    for kd_name, fused_on, compiled in cells:
        name = f"{kd_name}_{'fused' if fused_on else 'chunked'}_{'compile' if compiled else 'eager'}"
        if check.deadline and time.perf_counter() > check.deadline:
            rows.append({"cell": name, "skipped": "time budget"})
            continue
        check.reset_peak()
        torch.manual_seed(0)
        student = _build(node_s, dev, dtype)
        if compiled:  # compile, then activation checkpointing: the recipe's order
            training.compile_model(student, verbose=False)
            if not teacher_compiled:  # as the recipe's `compile: true` does; eager cells ran before this
                training.compile_model(teacher, verbose=False)
                teacher_compiled = True
        training.set_activation_checkpointing(student, auto_wrap_policy={TransformerSelfAttentionLayer})
        if kd_name == "tad":
            kd = TADLoss(top_k=10, beta=2.0, num_output_chunks=8)
        else:
            kd = ForwardKLLoss(num_output_chunks=8)
        fused = FusedLinearDistillationLoss(kd, chunk_size=s.seq, compile_chunk=compiled) if fused_on else None
        if not fused_on:
            use_tensor_split_output(student, 8)
            use_tensor_split_output(teacher, 8)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=check.cuda)
        step = _train_step(student, teacher, kd, fused, opt, s, dev)
        try:
            t0 = time.perf_counter()
            step()  # warm-up (and compilation)
            check.sync()
            warm_s = time.perf_counter() - t0
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with sync_debug(check, "warn"):
                    step()
            syncs = sum("synchroniz" in str(w.message).lower() for w in caught) if check.cuda else None
            times = check.time_ms(step, s.recipe_steps, warmup=0)
        except torch.OutOfMemoryError as e:
            rows.append({"cell": name, "error": f"OOM: {str(e).splitlines()[0][:160]}"})
            del student, opt, fused, step
            check.reset_peak()
            continue
        tokens_per_s = s.batch * s.seq / (statistics.median(times) / 1e3)
        fpt = estimate_flops_per_token(flops_cfg, node_t, s.seq, loss="tad" if kd_name == "tad" else "kl",
                                       fused=fused_on, fused_chunk_size=s.seq).total  # fmt: skip
        peak_gib = check.peak_gib()
        rows.append({"cell": name, "kd": kd_name, "fused": fused_on, "compile": compiled,
                     "teacher_compiled": teacher_compiled,
                     "step_ms_median": statistics.median(times), "first_step_s": warm_s, "tokens_per_s": tokens_per_s,
                     "flops_per_token": fpt, "mfu": tokens_per_s * fpt / peak, "peak_gib": peak_gib,
                     "plan_gib": plan_gib, "plan_error": None if peak_gib is None else plan_gib / peak_gib - 1,
                     "host_syncs_per_step": syncs})  # fmt: skip
        check.log(f"recipe {name}: {rows[-1]}")
        check.csv("recipe", rows)
        # The step closure holds the student and its optimizer: drop it too, or the next cell's peak counts two.
        del student, opt, fused, step
    check.csv("recipe", rows)
    return {"plan_gib": plan_gib, "rows": rows}


# --------------------------------------------------------------------------------------------------------
def part_gemma2(check: Check) -> dict[str, Any]:
    """Gemma-2: soft-capped attention and logits, sliding window; flex (compiled on CUDA) vs eager."""
    from tad_torchtune.models.gemma2 import gemma2

    s, dev = check.sizes, check.device
    dtype = torch.bfloat16 if check.cuda else torch.float32
    dims = dict(vocab_size=s.vocab if check.dry_run else 256_000, num_layers=2, num_heads=16 if check.cuda else 2,
                head_dim=256 if check.cuda else 16, num_kv_heads=8 if check.cuda else 1,
                embed_dim=3584 if check.cuda else 32, intermediate_dim=4096 if check.cuda else 64)  # fmt: skip
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    models = {}
    for impl in ("eager", "flex"):
        torch.manual_seed(0)
        with torch.device(dev):
            models[impl] = gemma2(max_seq_len=s.gemma_seq, sliding_window=s.gemma_parity_window, attn_impl=impl, **dims)
        models[impl].to(dtype)
    models["flex"].load_state_dict(models["eager"].state_dict())
    tokens = torch.randint(0, dims["vocab_size"], (1, s.gemma_parity_seq), device=dev)
    with torch.no_grad():
        a = models["eager"](tokens).float()
        b = models["flex"](tokens).float()
    out["parity_max_abs_diff"] = (a - b).abs().max().item()
    out["parity_max_abs_logit"] = a.abs().max().item()
    out["logit_softcap_respected"] = bool(a.abs().max().item() <= 30.0 + 1e-3)
    check.log(f"gemma2 parity (S={s.gemma_parity_seq}, window {s.gemma_parity_window}): {out}")
    del models, a, b

    # Long sequence: flex forward + backward, window as configured for Gemma-2.
    with torch.device(dev):
        model = gemma2(max_seq_len=s.gemma_seq, sliding_window=s.gemma_window, attn_impl="flex", **dims)
    model.to(dtype)
    tokens = torch.randint(0, dims["vocab_size"], (1, s.gemma_seq), device=dev)

    def step():
        model(tokens).float().logsumexp(-1).mean().backward()

    check.reset_peak()
    t0 = time.perf_counter()
    step()
    check.sync()
    out["first_step_s"] = time.perf_counter() - t0
    times = check.time_ms(step, 2 if check.cuda else 1, warmup=0)
    out.update(seq=s.gemma_seq, window=s.gemma_window, fwd_bwd_ms_median=statistics.median(times))
    out["peak_gib"] = check.peak_gib()
    check.log(f"gemma2 flex long: {out}")
    return out


PART_FNS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "env": part_env,
    "correctness": part_correctness,
    "loss_stage": part_loss_stage,
    "recipe": part_recipe,
    "gemma2": part_gemma2,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run, in this order")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else ./gpu_check)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (< 1 min): proves the script runs")
    parser.add_argument("--device", default=None, help="default: cuda (refused when absent), cpu with --dry-run")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="recipe cells not started after this many seconds from the start, leaving gemma2 its ~2 min (default 360)",
    )
    parser.add_argument("--cells", nargs="+", default=[], help="recipe cells, e.g. tad_fused_compile (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available: this check measures a GPU (use --dry-run to exercise it on CPU)")
    out = args.out or Path(os.environ.get("OUT") or "gpu_check")
    check = Check(out, device, DRY if args.dry_run else Sizes(), args.dry_run)
    check.deadline = check.start + args.budget_s
    check.cells = args.cells
    if device.type == "cuda":
        # TF32 stays off (torch's default): the fp32 correctness checks form logits with fp32 matmuls.
        torch.cuda.set_device(device)
    failures = 0
    try:
        for part in args.parts:
            t0 = time.perf_counter()
            check.log(f"--- {part}")
            entry: dict[str, Any]
            try:
                entry = {"ok": True, **PART_FNS[part](check)}
            except Exception as e:  # one broken part must not cost the others' results
                failures += 1
                entry = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                check.log(f"{part} FAILED: {type(e).__name__}: {e}")
            entry["seconds"] = time.perf_counter() - t0
            check.results["parts"][part] = entry
            check.results["total_seconds"] = time.perf_counter() - check.start
            check.save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        check.log(f"done in {time.perf_counter() - check.start:.1f}s, {failures} part(s) failed; results in {out}")
        check._log.close()
    return 1 if failures else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
