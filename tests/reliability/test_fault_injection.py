"""SIGKILL the real training process at seeded points, resume, finish: the result equals an uninterrupted run.

Kill points (hooks the test runner ``tests/reliability/fault_runner.py`` installs into
``tad_torchtune.reliability.fault``; production code reads no environment variable for them): mid-step (after
backward, before the optimizer step), mid-checkpoint-write (first file written), before the atomic rename (all
files and the manifest written), after it (before pruning) and mid-prune (an old checkpoint renamed aside).
Each run is chained: the next process resumes from what the killed one left. Checked after every kill: the resumed
process starts at the newest complete checkpoint, it sees exactly the reference's data windows from there on (the
runner's data-window trace), every logged loss equals the uninterrupted run's, and the final weights are identical
(fp32; the 1e-6 bound is met with equality).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import REPO_ROOT, TINY_CONFIG, subprocess_env

pytestmark = pytest.mark.integration_test

TOTAL_STEPS = 8  # 2 epochs x 4 steps, a checkpoint every 2 steps (the last one is the final save)
SAVE_EVERY = 2
ONE_PROC = [
    "epochs=2",
    "max_steps_per_epoch=4",
    f"save_every_n_steps={SAVE_EVERY}",
    "keep_last_n_checkpoints=2",
    "batch_size=2",
    "gradient_accumulation_steps=2",
    "log_peak_memory_stats=false",
]
TWO_PROC = ["epochs=1", "max_steps_per_epoch=4", f"save_every_n_steps={SAVE_EVERY}", "batch_size=2",
            "log_peak_memory_stats=false"]  # fmt: skip
TIMEOUT = 300
# Points a seeded chain draws from (mid_prune only fires at saves that prune, so the named chain covers it).
SEEDED_POINTS = ("mid_step", "mid_checkpoint", "before_rename", "after_rename")


def _launch(assets: Path, out: Path, overrides: list[str], *, resume: bool, trace: Path, kill: str | None, nproc=1):
    cmd = [sys.executable, "-m", "tests.reliability.fault_runner"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--monitor-interval=0.5", "-m", "tests.reliability.fault_runner"]  # fmt: skip
    cmd += ["--config", str(TINY_CONFIG), f"assets_dir={assets}", f"output_dir={out}", *overrides]
    cmd.append(f"resume_from_checkpoint={str(resume).lower()}")
    env = subprocess_env(TEST_TRACE_BATCHES=str(trace), **({"TEST_FAULT_INJECT": kill} if kill else {}))
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _trace(path: Path, rank: int = 0) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["rank"] == rank]


def _logged(out: Path) -> list[tuple[int, float]]:
    rows = []
    for p in sorted((out / "logs").glob("log_*.txt")):
        for line in p.read_text().splitlines():
            if line.startswith("Step "):
                step, rest = line[5:].split(" | ", 1)
                values = dict(kv.split(":", 1) for kv in rest.split())
                rows.append((int(step), float(values["loss"])))
    return rows


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"step_{step:07d}" / "model.pt", weights_only=True)


def _reference(assets: Path, out: Path, overrides: list[str], nproc: int = 1) -> dict:
    proc = _launch(assets, out, overrides, resume=False, trace=out.parent / f"{out.name}.jsonl", kill=None, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trace = {r["step"]: r["windows"] for r in _trace(out.parent / f"{out.name}.jsonl")}
    losses = dict(_logged(out))
    steps = max(trace)
    assert sorted(trace) == sorted(losses) == list(range(1, steps + 1))
    return {"windows": trace, "losses": losses, "weights": _weights(out, steps), "steps": steps}


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> dict:
    """One uninterrupted single-process run (per test worker) every chain is compared with."""
    return _reference(assets, tmp_path_factory.mktemp("reference") / "run", ONE_PROC)


def _after_kill(c: int, point: str, step: int) -> int:
    """Newest complete checkpoint after a kill at (point, step), given the process resumed from ``c``."""
    if point in ("after_rename", "mid_prune"):
        return step
    if point == "mid_step":
        return max(c, (step - 1) // SAVE_EVERY * SAVE_EVERY)
    return max(c, step - SAVE_EVERY)  # mid_checkpoint / before_rename: the previous save is the newest


def _run_chain(assets: Path, out: Path, kills: list[str], ref: dict) -> int:
    """Runs the kill chain then a final uninterrupted resume; returns the number of kills survived."""
    c = 0
    for i, kill in enumerate([*kills, None]):
        trace = out / f"trace_{i}.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        proc = _launch(assets, out, ONE_PROC, resume=c > 0, trace=trace, kill=kill)
        where = f"process {i} ({kill or 'no kill'}, resumed from step {c})"
        if kill is None:
            assert proc.returncode == 0, f"{where}\n{proc.stderr[-4000:]}"
            end = ref["steps"]
        else:
            assert proc.returncode == -9, f"{where} exited {proc.returncode}\n{proc.stderr[-4000:]}"
            point, step = kill.split(":")
            end = int(step)
        if c > 0:
            assert f"resuming from {out / 'checkpoints' / f'step_{c:07d}'}" in proc.stdout + proc.stderr, where
        seen = _trace(trace)
        # No window skipped or seen twice: this process ran exactly steps c+1..end, each on the reference's window.
        assert [r["step"] for r in seen] == list(range(c + 1, end + 1)), where
        for r in seen:
            assert r["windows"] == ref["windows"][r["step"]], f"{where}: step {r['step']} saw another data window"
        if kill is not None:
            c = _after_kill(c, point, int(step))
    logged = _logged(out)
    assert {s for s, _ in logged} == set(range(1, ref["steps"] + 1))
    for step, loss in logged:  # every logged loss, including steps a kill later rolled back
        assert loss == pytest.approx(ref["losses"][step], rel=1e-6, abs=0), f"step {step}"
    final = _weights(out, ref["steps"])
    for k, v in ref["weights"].items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6)
    assert not list((out / "checkpoints").glob("step_*.*-*"))  # interrupted writes and deletes were cleaned up
    assert len(list((out / "checkpoints").glob("step_*"))) <= 2  # keep_last_n_checkpoints
    assert (out / "epoch_1").is_dir()  # the final student export happened exactly once the run finished
    return len(kills)


def test_named_kill_points_resume_exactly(assets, reference, tmp_path):
    kills = [
        "mid_step:3",  # between checkpoints
        "mid_checkpoint:4",  # model.pt of step 4 written, nothing else
        "before_rename:4",  # every file + manifest written, folder not renamed: still incomplete
        "after_rename:4",  # step 4 complete (end of epoch 0), older ones not yet pruned
        "mid_prune:6",  # step 6 complete, step 2 renamed aside for deletion, not yet deleted
        "mid_checkpoint:8",  # during the final save
    ]
    assert _run_chain(assets, tmp_path / "run", kills, reference) == 6


def _seeded_kills(seed: int, n: int) -> list[str]:
    rng, c, kills = random.Random(seed), 0, []
    while len(kills) < n:
        point = rng.choice(SEEDED_POINTS)
        saves = [s for s in range(SAVE_EVERY, TOTAL_STEPS + 1, SAVE_EVERY) if s > c]
        step = rng.randint(c + 1, TOTAL_STEPS) if point == "mid_step" else rng.choice(saves)
        if _after_kill(c, point, step) >= TOTAL_STEPS or f"{point}:{step}" in kills:
            continue  # keep something to resume after every kill; no repeats
        kills.append(f"{point}:{step}")
        c = _after_kill(c, point, step)
    return kills


def test_seeded_random_kill_points_resume_exactly(assets, reference, tmp_path):
    kills = _seeded_kills(seed=20261123, n=5)
    assert len(set(kills)) == 5
    assert _run_chain(assets, tmp_path / "run", kills, reference) == 5


def test_two_processes_kill_one_rank_then_resume(assets, tmp_path):
    """torchrun, gloo: rank 1 SIGKILLed mid-step 3 ends the job non-zero quickly; 2 processes then resume."""
    ref = _reference(assets, tmp_path / "ref", TWO_PROC, nproc=2)
    out, trace = tmp_path / "run", tmp_path / "run_killed.jsonl"
    proc = _launch(assets, out, TWO_PROC, resume=False, trace=trace, kill="mid_step:3@1", nproc=2)
    ended = time.time()
    assert proc.returncode != 0
    killed_at = trace.stat().st_mtime  # rank 1 wrote its step-3 trace line right before killing itself
    assert [r["step"] for r in _trace(trace, rank=1)] == [1, 2, 3]
    assert ended - killed_at < 60, f"the job took {ended - killed_at:.0f} s to exit after rank 1 died"
    assert "Signals.SIGKILL" in proc.stderr or "SIGKILL" in proc.stderr or "exitcode" in proc.stderr
    trace2 = tmp_path / "run_resumed.jsonl"
    proc = _launch(assets, out, TWO_PROC, resume=True, trace=trace2, kill=None, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        seen = _trace(trace2, rank)
        assert [r["step"] for r in seen] == [3, 4]
        ref_rank = {r["step"]: r["windows"] for r in _trace(tmp_path / "ref.jsonl", rank)}
        assert all(r["windows"] == ref_rank[r["step"]] for r in seen)
    for step, loss in _logged(out):
        assert loss == pytest.approx(ref["losses"][step], rel=1e-6, abs=0), f"step {step}"
    final = _weights(out, 4)
    for k, v in ref["weights"].items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6)
