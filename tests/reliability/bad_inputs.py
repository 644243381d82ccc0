"""A table of bad inputs to every ``tad-tune`` command and to the recipe, and how each one ended.

Each row is ``(id, argv of tad-tune, words the message must contain)``; ``{W}`` in an argument is the world
folder :func:`build_world` made (tiny assets, a folder holding another run's checkpoint, a run written by two
processes, a poisoned student, a pickled step checkpoint, a non-empty export target, an empty corpus).

:func:`run_row` runs ``tad_torchtune.cli.main`` in this process (the recipe through ``tune run``'s runpy, as
on the command line) and :func:`classify` sorts the outcome into

- ``damaging``: a file that existed before was changed or removed;
- ``silent``: exit code 0;
- ``traceback``: an exception escaped, or the output shows a traceback;
- ``unclear``: a clean non-zero exit whose message lacks the expected words (what and the value);
- ``clear``: a non-zero exit, no traceback, the expected words, nothing touched.

``python -m tests.reliability.bad_inputs`` prints one line per row and the counts (also against an older
checkout: the world is built with files only, no new API).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")
EVAL = str(Path(__file__).resolve().parents[2] / "configs" / "eval_tiny_cpu.yaml")


_fresh = iter(range(1000))


def _run(*extra: str, out: str | None = None) -> list[str]:
    """argv of the recipe through ``tad-tune run`` (``tune run``), on the tiny config (a new output_dir per row)."""
    out = out or f"{{W}}/fresh_{next(_fresh)}"
    return ["run", "knowledge_distillation_tad", "--config", TINY, "assets_dir={W}/assets", f"output_dir={out}", *extra]


def _val(*extra: str, out: str | None = None) -> list[str]:
    out = out or f"{{W}}/fresh_{next(_fresh)}"
    return ["validate", "--config", TINY, "assets_dir={W}/assets", f"output_dir={out}", *extra]


# (id, argv, words the one message must contain, case-insensitive)
ROWS: list[tuple[str, list[str], list[str]]] = [
    # --- the recipe under tune run: non-finite and out-of-range numbers ---
    ("run clip_grad_norm=.nan", _run("clip_grad_norm=.nan"), ["clip_grad_norm", "finite", "nan"]),
    ("run optimizer.lr=.inf", _run("optimizer.lr=.inf"), ["optimizer.lr", "finite", "inf"]),
    ("run kd_weight=.nan", _run("kd_weight=.nan"), ["kd_weight", "finite"]),
    ("run optimizer.lr=1e39", _run("optimizer.lr=1e39"), ["optimizer.lr", "<= 10", "1e+39"]),
    ("run seed=abc", _run("seed=abc"), ["seed", "integer", "abc"]),
    ("run seed=-1", _run("seed=-1"), ["seed", "[0, 4294967295]", "-1"]),
    ("run seed=1.5", _run("seed=1.5"), ["seed", "integer", "1.5"]),
    ("run epochs=0", _run("epochs=0"), ["epochs", ">= 1"]),
    ("run batch_size=-2", _run("batch_size=-2"), ["batch_size", ">= 1"]),
    ("run gradient_accumulation_steps=1.5", _run("gradient_accumulation_steps=1.5"), ["gradient_accumulation", "1.5"]),
    ("run max_steps_per_epoch=0", _run("max_steps_per_epoch=0"), ["max_steps_per_epoch", ">= 1"]),
    ("run kd_loss.top_k=0", _run("kd_loss.top_k=0"), ["kd_loss.top_k", ">= 1"]),
    ("run kd_loss.top_k=259", _run("kd_loss.top_k=259"), ["top_k=259", "vocabulary"]),
    ("run kd_loss.beta=.nan", _run("kd_loss.beta=.nan"), ["kd_loss.beta", "finite"]),
    ("run kd_loss.beta=0", _run("kd_loss.beta=0"), ["kd_loss.beta", "> 0"]),
    ("run kd_ratio=2", _run("kd_ratio=2"), ["kd_ratio", "[0, 1]"]),
    ("run cosine_weight=-1", _run("cosine_weight=-1"), ["cosine_weight", ">= 0"]),
    ("run ce_weight=.inf", _run("ce_weight=.inf"), ["ce_weight", "finite"]),
    ("run fused_chunk_size=0", _run("fused_chunk_size=0"), ["fused_chunk_size", ">= 1"]),
    ("run optimizer.weight_decay=.nan", _run("optimizer.weight_decay=.nan"), ["weight_decay", "finite"]),
    ("run lr_scheduler.num_warmup_steps=-1", _run("lr_scheduler.num_warmup_steps=-1"), ["num_warmup_steps", ">= 0"]),
    ("run tokenizer.max_seq_len=0", _run("tokenizer.max_seq_len=0"), ["max_seq_len"]),
    ("run peak_flops=-1", _run("peak_flops=-1"), ["peak_flops", "-1"]),
    # --- the recipe: wrong kinds and spellings ---
    ("run nonfinite_policy=skp", _run("nonfinite_policy=skp"), ["nonfinite_policy", "skp", "did you mean"]),
    ("run dtype=fp16", _run("dtype=fp16"), ["dtype", "fp16"]),
    ("run fused_loss=maybe", _run("fused_loss=maybe"), ["fused_loss", "maybe"]),
    ("run shuffle=2", _run("shuffle=2"), ["shuffle", "true or false", "2"]),
    ("run log_flops=maybe", _run("log_flops=maybe"), ["log_flops", "maybe"]),
    ("run compile=1", _run("compile=1"), ["compile", "true or false"]),
    ("run epohcs=2", _run("epohcs=2"), ["epohcs", "did you mean 'epochs'"]),
    ("run kd_loss.topk=5", _run("kd_loss.topk=5"), ["topk", "top_k"]),
    ("run kd_loss=tad_torchtune.TADLos", _run("kd_loss=tad_torchtune.TADLos"), ["TADLos", "cannot import"]),
    ("run ~nosuchkey", _run("~nosuchkey"), ["nosuchkey"]),
    ("run bare override", _run("epochs"), ["epochs", "key=value"]),
    ("run --config missing", ["run", "knowledge_distillation_tad", "--config", "{W}/nope.yaml"], ["nope.yaml"]),
    # --- the recipe: files and folders ---
    ("run empty dataset", _run("dataset.data_files={W}/empty.jsonl"), ["dataset", "no records"]),
    ("run missing dataset", _run("dataset.data_files={W}/nope.jsonl"), ["dataset", "nope.jsonl"]),
    ("run missing student dir", _run("checkpointer.checkpoint_dir={W}/nope"), ["checkpointer", "nope"]),
    ("run missing teacher file", _run("teacher_checkpointer.checkpoint_files=[x.pt]"), ["teacher", "x.pt"]),
    ("run teacher is student", _run("teacher_checkpointer.checkpoint_dir={W}/assets/student"), ["teacher_model"]),
    ("run student dims", _run("model.intermediate_dim=96"), ["checkpointer", "(96, 64)"]),
    ("run output_dir under a file", _run(out="{W}/afile/run"), ["output_dir", "is a file"]),
    ("run NaN in student input", _run("checkpointer.checkpoint_dir={W}/nan_student"), ["non-finite", "tok_embeddings"]),
    ("run pickled resume", _run("resume_from_checkpoint={W}/evil_run/checkpoints/step_0000002"), ["refusing"]),
    ("run resume half folder", _run("resume_from_checkpoint={W}/half"), ["resume_from_checkpoint", "manifest"]),
    # --- the recipe: whose folder is it ---
    ("run new run in another's folder", _run(out="{W}/other_run"), ["another run", "resume_from_checkpoint=true"]),
    ("run resume 2-process run on 1", _run("resume_from_checkpoint=true", out="{W}/run2"), ["world size: 2 -> 1"]),
    (
        "run resume batch_size drift",
        _run("resume_from_checkpoint=true", "batch_size=8", out="{W}/run2"),
        ["batch_size: 4 -> 8"],
    ),
    ("run folder in use", _run("resume_from_checkpoint=true", out="{W}/locked"), ["in use by another run"]),
    # --- validate ---
    ("validate seed=abc", _val("seed=abc"), ["seed", "abc"]),
    ("validate clip_grad_norm=.nan", _val("clip_grad_norm=.nan"), ["clip_grad_norm", "finite"]),
    ("validate optimizer.lr=1e39", _val("optimizer.lr=1e39"), ["optimizer.lr"]),
    (
        "validate pickled step checkpoint",
        _val("resume_from_checkpoint={W}/evil_run/checkpoints/step_0000002"),
        ["refusing", "recipe_state.pt"],
    ),
    ("validate empty dataset", _val("dataset.data_files={W}/empty.jsonl"), ["no records"]),
    ("validate missing config", ["validate", "--config", "{W}/nope.yaml"], ["nope.yaml"]),
    ("validate folder in use", _val(out="{W}/locked"), ["output_dir", "in use by another run"]),
    ("validate 2-process resume", _val("resume_from_checkpoint=true", out="{W}/run2"), ["world size: 2 -> 1"]),
    # --- eval ---
    ("eval taks=", ["run", "eval_tad", "--config", EVAL, "taks=[tiny_arith_mc]"], ["taks", "tasks"]),
    ("eval tasks=[]", ["run", "eval_tad", "--config", EVAL, "tasks=[]"], ["tasks", "empty"]),
    # --- export-hf ---
    (
        "export-hf into a non-empty folder",
        [
            "export-hf",
            "--config",
            TINY,
            "--weights",
            "{W}/assets/student/model.pt",
            "--out",
            "{W}/other_run",
            "assets_dir={W}/assets",
        ],
        ["non-empty", "--force"],
    ),
    (
        "export-hf missing weights",
        ["export-hf", "--config", TINY, "--weights", "{W}/nope.pt", "--out", "{W}/fresh_export"],
        ["nope.pt"],
    ),
    (
        "export-hf missing config",
        [
            "export-hf",
            "--config",
            "{W}/nope.yaml",
            "--weights",
            "{W}/assets/student/model.pt",
            "--out",
            "{W}/fresh_export",
        ],
        ["nope.yaml"],
    ),
    # --- tokenize ---
    (
        "tokenize empty source",
        [
            "tokenize",
            "--tokenizer",
            "tad_torchtune.training.byte_tokenizer",
            "--source",
            "{W}/empty.jsonl",
            "--output",
            "{W}/fresh_tok/t.bin",
        ],
        ["empty"],
    ),
    (
        "tokenize missing source",
        [
            "tokenize",
            "--tokenizer",
            "tad_torchtune.training.byte_tokenizer",
            "--source",
            "{W}/nope.jsonl",
            "--output",
            "{W}/fresh_tok/t.bin",
        ],
        ["nope.jsonl"],
    ),
    (
        "tokenize bad tokenizer",
        [
            "tokenize",
            "--tokenizer",
            "no.such.tokenizer",
            "--source",
            "{W}/assets/data/train.jsonl",
            "--output",
            "{W}/fresh_tok/t.bin",
        ],
        ["no.such.tokenizer"],
    ),
    # --- other commands ---
    ("plan missing config", ["plan", "--config", "{W}/nope.yaml"], ["nope.yaml"]),
    ("flops missing config", ["flops", "--config", "{W}/nope.yaml"], ["nope.yaml"]),
    ("flops unknown student", ["flops", "--student", "no_such_model"], ["no_such_model"]),
    ("init-student missing config", ["init-student", "--config", "{W}/nope.yaml"], ["nope.yaml"]),
    (
        "diagnose missing text",
        [
            "diagnose",
            "tail",
            "--config",
            TINY,
            "--text",
            "{W}/nope.jsonl",
            "--out",
            "{W}/fresh_diag",
            "assets_dir={W}/assets",
        ],
        ["nope.jsonl"],
    ),
    # --- offline ---
    ("offline unknown verb", ["offline", "scour"], ["scour", "score"]),
    (
        "offline score missing corpus",
        [
            "offline",
            "score",
            "--config",
            TINY,
            "assets_dir={W}/assets",
            "--data",
            "{W}/nope.bin",
            "--max-seq-len",
            "16",
            "--out",
            "{W}/fresh_score",
            "--reference-key",
            "model",
            "--reference-checkpointer-key",
            "checkpointer",
        ],
        ["nope.json", "not found"],
    ),
    (
        "offline score without a reference",
        ["offline", "score", "--config", TINY, "assets_dir={W}/assets", "--data", "{W}/nope.bin", "--out", "{W}/f"],
        ["reference_model", "--reference-config"],
    ),
    (
        "offline generate max-new-tokens 0",
        [
            "offline",
            "generate",
            "--config",
            TINY,
            "assets_dir={W}/assets",
            "--data",
            "{W}/nope.bin",
            "--max-seq-len",
            "16",
            "--prefix-len",
            "4",
            "--max-new-tokens",
            "0",
            "--out",
            "{W}/fresh_gen",
        ],
        ["--max-new-tokens", ">= 1", "0"],
    ),
    (
        "offline select missing scores",
        ["offline", "select", "--scores", "{W}/nope", "--output", "{W}/s.bin"],
        ["nope", "no offline pass"],
    ),
]


def _patch_manifest(folder: Path, run: dict) -> None:
    """Adds a ``run`` record to a checkpoint's manifest (the manifest does not hash itself)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["run"] = run
    path.write_text(json.dumps(manifest))


def build_world(root: Path) -> Path:
    """Writes every file the rows refer to under ``root`` (files only: works against older checkouts too)."""
    from omegaconf import OmegaConf

    from tad_torchtune.training.checkpoint import save_step_checkpoint
    from tad_torchtune.training.tiny import write_tiny_assets

    root.mkdir(parents=True, exist_ok=True)
    assets = write_tiny_assets(root / "assets", seed=0)
    (root / "empty.jsonl").write_text("")
    (root / "afile").write_text("not a folder")
    (root / "half").mkdir()
    student = torch.load(assets / "student" / "model.pt", weights_only=True)
    # Another run's folder: a complete checkpoint and a log (a new run must not start here).
    save_step_checkpoint(root / "other_run" / "checkpoints", 2, student, {"state": {}}, {"global_step": 2})
    (root / "other_run" / "logs").mkdir()
    (root / "other_run" / "logs" / "log_1.txt").write_text("Step 1 | loss:1.0\n")
    # A run written by 2 processes with the tiny config (batch_size 4), as its manifest records.
    cfg = OmegaConf.load(TINY)
    cfg.assets_dir, cfg.output_dir = str(assets), str(root / "run2")
    cfg.resume_from_checkpoint = True
    ck = save_step_checkpoint(root / "run2" / "checkpoints", 2, student, {"state": {}}, {"world_size": 2})
    resolved = OmegaConf.to_container(cfg, resolve=True)
    _patch_manifest(ck, {"id": "run-two", "config_fingerprint": "x", "world_size": 2, "config": resolved})
    # A step checkpoint whose recipe_state.pt carries a pickle payload (its manifest re-written to match).
    evil = save_step_checkpoint(root / "evil_run" / "checkpoints", 2, student, {"state": {}}, {"global_step": 2})
    torch.save({"global_step": 2, "x": _Payload(str(root / "PWNED"))}, evil / "recipe_state.pt")
    from tad_torchtune.reliability.manifest import write_manifest

    write_manifest(evil, 2)
    # The student with one NaN row (an id the tokenizer never emits: it would be trained and saved unnoticed).
    (root / "nan_student").mkdir()
    poisoned = dict(student)
    poisoned["tok_embeddings.weight"] = student["tok_embeddings.weight"].clone()
    poisoned["tok_embeddings.weight"][258] = float("nan")
    torch.save(poisoned, root / "nan_student" / "model.pt")
    (root / "locked").mkdir()
    return root


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@contextlib.contextmanager
def hold_lock(folder: Path):
    """Another live process holding ``folder``'s run lock (flock) while the block runs."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'pid %d (test holder)' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / ".tad_run.lock")], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def run_row(argv: list[str], world: Path) -> tuple[int | str, str]:
    """Runs ``tad-tune argv`` in this process; (exit code, or "exception" if one escaped; stdout + stderr)."""
    from tad_torchtune import cli

    argv = [a.replace("{W}", str(world)) for a in argv]
    buf = io.StringIO()
    saved_argv, saved_env = list(sys.argv), dict(os.environ)
    handler = logging.StreamHandler(buf)
    logging.getLogger().addHandler(handler)
    code: int | str
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code)
            except Exception as e:  # escaped: what the user sees is a traceback
                code = "exception"
                print(f"Traceback (escaped): {type(e).__name__}: {e}")
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        logging.getLogger().removeHandler(handler)
    return code, buf.getvalue()


def classify(code: int | str, output: str, words: list[str], before: dict, after: dict) -> str:
    """``damaging``, ``silent``, ``traceback``, ``unclear`` or ``clear`` (see the module docstring)."""
    changed = [k for k, v in before.items() if after.get(k) != v]
    if changed:
        return "damaging"
    if code == 0:
        return "silent"
    if code == "exception" or "Traceback" in output:
        return "traceback"
    low = output.lower()
    if not all(w.lower() in low for w in words):
        return "unclear"
    return "clear"


def survey(world: Path) -> Counter:
    counts: Counter = Counter()
    for name, argv, words in ROWS:
        t0 = time.perf_counter()
        ctx = hold_lock(world / "locked") if "in use" in " ".join(words) else contextlib.nullcontext()
        with ctx:
            before = snapshot(world)
            code, out = run_row(argv, world)
        verdict = classify(code, out, words, before, snapshot(world))
        counts[verdict] += 1
        last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or [""]
        print(f"{verdict:9s} exit={code!s:9s} {time.perf_counter() - t0:5.1f}s {name}: {last[0][:160]}")
    print(dict(counts), f"of {len(ROWS)}")
    return counts


if __name__ == "__main__":
    world_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/tad_bad_inputs_world")
    shutil.rmtree(world_dir, ignore_errors=True)
    survey(build_world(world_dir))
