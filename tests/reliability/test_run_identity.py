"""A run owns its folder and never saves a bad number (issue 19): lock, run id, config drift, finite or refused.

Each test names the finding it closes; each failed on the code before this change (see its docstring).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tad_torchtune.checkpoint.manifest import read_run_record, remove_stale_partials
from tad_torchtune.checkpoint.steps import find_latest_checkpoint, list_checkpoints, save_step_checkpoint
from tad_torchtune.reliability.guards import NonFiniteError
from tad_torchtune.reliability.run_identity import (
    LauncherGoneError,
    ParentWatch,
    RunLock,
    RunLockError,
    compare_configs,
    run_record,
)
from tad_torchtune.validate import main as validate_main
from tad_torchtune.validate import validate_config
from tests.reliability.bad_inputs import hold_lock
from tests.reliability.conftest import TINY_CONFIG, tiny_cfg

SHORT = {"max_steps_per_epoch": 2, "save_every_n_steps": 1, "log_peak_memory_stats": False, "log_flops": False}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


def _train(cfg):
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    recipe = KDTADRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


# --- 1. one run per folder ----------------------------------------------------------------------------------
def test_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    """Before: nothing stopped two processes writing one output_dir."""
    with hold_lock(tmp_path) as holder:
        with pytest.raises(RunLockError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)  # a holder killed mid-run leaves its lock file behind
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the dead holder's flock: taken over, no manual cleanup
    assert f"pid {os.getpid()}" in (tmp_path / ".tad_run.lock").read_text()
    lock.release()


def test_ranks_other_than_0_do_not_see_their_own_rank_0s_lock_as_another_run(assets, tmp_path, monkeypatch):
    """Rank 1 validates while rank 0 of the same job may already hold the lock: only rank 0 checks it."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    out = tmp_path / "run"
    out.mkdir()
    with hold_lock(out):  # stands for this job's rank 0
        (problem,) = validate_config(tiny_cfg(assets, out), check_data=False)
        assert problem.key == "output_dir" and "is in use by another run" in problem.message
        monkeypatch.setenv("RANK", "1")
        recipe = KDTADRecipe(tiny_cfg(assets, out))  # no refusal, no lock taken
        assert recipe._run_lock is None
        recipe.cleanup()


def test_pruning_never_touches_another_runs_checkpoints(tmp_path):
    """Before: a new run's saves 1-5 were pruned at once because another run's steps 8-9 ranked as newer."""
    root = tmp_path / "checkpoints"
    theirs = run_record("theirs", {"batch_size": 4}, 1)
    mine = run_record("mine", {"batch_size": 4}, 1)
    for step in (8, 9):
        save_step_checkpoint(root, step, {"w": torch.ones(2)}, {}, {"global_step": step}, keep_last_n=2, run=theirs)
    for step in range(1, 6):
        save_step_checkpoint(root, step, {"w": torch.ones(2)}, {}, {"global_step": step}, keep_last_n=2, run=mine)
    by_run = {p.name: read_run_record(p)["id"] for p in list_checkpoints(root)}
    assert by_run == {
        "step_0000004": "mine",
        "step_0000005": "mine",
        "step_0000008": "theirs",
        "step_0000009": "theirs",
    }
    assert not list(root.glob("*.del-*"))  # pruned by rename-then-delete, nothing left half-way


def test_new_run_in_another_runs_folder_and_ambiguous_resume_are_refused(assets, tmp_path):
    """Before: a new run started there (pruning the other's work); `true` resumed the other run's newest step."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    save_step_checkpoint(root, 8, {"w": torch.ones(2)}, {}, {"world_size": 1}, run=run_record("a", {}, 1))
    (problem,) = validate_config(tiny_cfg(assets, out), check_data=False)
    assert problem.key == "resume_from_checkpoint" and "checkpoint(s) of another run (run a;" in problem.message
    assert "set resume_from_checkpoint=true to continue that run, or use a new output_dir" in problem.message
    save_step_checkpoint(root, 9, {"w": torch.ones(2)}, {}, {"world_size": 1}, run=run_record("b", {}, 1))
    (problem,) = validate_config(tiny_cfg(assets, out, resume_from_checkpoint=True), check_data=False)
    assert "checkpoints of 2 runs (a, b)" in problem.message and "resume_from_checkpoint=<path" in problem.message


def test_checkpoints_from_before_run_records_do_not_make_a_resume_ambiguous(assets, tmp_path):
    """A run started before run records existed, resumed once after (new checkpoints recorded), resumes again."""
    root = tmp_path / "run" / "checkpoints"
    save_step_checkpoint(root, 2, {"w": torch.ones(2)}, {}, {"world_size": 1})  # no run record
    save_step_checkpoint(root, 4, {"w": torch.ones(2)}, {}, {"world_size": 1}, run=run_record("r", {}, 1))
    problems = validate_config(tiny_cfg(assets, tmp_path / "run", resume_from_checkpoint=True), check_data=False)
    assert not [p for p in problems if "runs (" in p.message], problems


def test_a_worker_whose_launcher_dies_stops(tmp_path):
    """Before: SIGKILL of the torchrun launcher left both ranks training unattended."""
    stopped = tmp_path / "stopped"
    worker = (
        "import sys, time\n"
        "from tad_torchtune.reliability.run_identity import ParentWatch, LauncherGoneError\n"
        "w = ParentWatch()\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    while True:\n"
        "        w.check(); time.sleep(0.05)\n"
        "except LauncherGoneError as e:\n"
        f"    open({str(stopped)!r}, 'w').write(str(e))\n"
    )
    launcher = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE)\n"
        "print(p.stdout.readline().decode().strip(), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", launcher, worker], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    proc.kill()  # the launcher dies by SIGKILL: no chance to stop its child
    proc.wait()
    deadline = time.time() + 20
    while not stopped.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert stopped.exists() and "has exited; stopping at this step boundary" in stopped.read_text()
    with pytest.raises(LauncherGoneError):  # and in-process: a changed parent pid is noticed
        w = ParentWatch()
        w.parent = -1
        w.check()


def test_leftovers_of_an_interrupted_prune_are_cleaned_at_start(assets, tmp_path):
    """Before: a kill during pruning left a half-deleted step_N/ that was never cleaned (now: renamed aside first)."""
    root = tmp_path / "run" / "checkpoints"
    (root / "step_0000002.del-123").mkdir(parents=True)
    (root / "step_0000002.del-123" / "model.pt").write_bytes(b"half")
    (root / "step_0000004.tmp-9").mkdir()
    assert sorted(p.name for p in remove_stale_partials(root)) == ["step_0000002.del-123", "step_0000004.tmp-9"]


# --- 2. finite or refused ------------------------------------------------------------------------------------
def test_guard_checks_the_clipped_update_and_the_learning_rate(assets, tmp_path):
    """Before: clip_grad_norm=nan (or lr=inf) wrote NaN into every weight: the guard saw the finite pre-clip norm."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    for name, poison in (("clip", None), ("lr", float("inf"))):
        cfg = tiny_cfg(assets, tmp_path / name, **SHORT)
        recipe = KDTADRecipe(cfg)
        try:
            recipe.setup(cfg)
            before = {k: v.clone() for k, v in recipe.student.state_dict().items()}
            if name == "clip":
                recipe._clip_grad_norm = float("nan")  # validation refuses it; the guard must hold on its own
            else:
                for g in recipe.optimizer.param_groups:
                    g["lr"] = poison
                recipe._lr_scheduler = None
            recipe.train()
        finally:
            recipe.cleanup()
        assert recipe.guard.skipped == 2, name
        assert "first in update (after clipping, times the learning rate)" in recipe.guard.last_report
        for k, v in recipe.student.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)


def test_a_non_finite_weight_is_never_saved(assets, tmp_path):
    """Before: NaN weights were written into step checkpoints and the final model with exit 0."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    cfg = tiny_cfg(assets, tmp_path / "run", **SHORT)
    recipe = KDTADRecipe(cfg)
    try:
        recipe.setup(cfg)
        with torch.no_grad():
            recipe.student.layers[1].mlp.w2.weight[3, 5] = float("inf")
        with pytest.raises(NonFiniteError, match=r"student weight 'layers.1.mlp.w2.weight' has 0 NaN and 1 inf"):
            recipe.save_checkpoint()
    finally:
        recipe.cleanup()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_nan_student_input_is_refused_naming_the_tensor(assets, tmp_path):
    """Before: a NaN row in the student's input checkpoint was trained and saved without notice."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe

    sd = torch.load(assets / "student" / "model.pt", weights_only=True)
    sd["tok_embeddings.weight"][258, 7] = float("nan")
    (tmp_path / "student").mkdir()
    torch.save(sd, tmp_path / "student" / "model.pt")
    cfg = tiny_cfg(assets, tmp_path / "run", **{"checkpointer.checkpoint_dir": str(tmp_path / "student")}, **SHORT)
    recipe = KDTADRecipe(cfg)
    try:
        with pytest.raises(ValueError, match=r"'tok_embeddings.weight' has 1 NaN .*first at index \(258, 7\)"):
            recipe.setup(cfg)
    finally:
        recipe.cleanup()


def test_nan_teacher_row_past_the_student_vocabulary_is_ignored_by_both_paths(assets, tmp_path):
    """Before: the fused path ignored it (the row is cut) while the chunked path skipped every step."""
    sd = torch.load(assets / "teacher" / "model.pt", weights_only=True)
    sd["output.weight"][262] = float("nan")  # teacher vocabulary 264, student 259: row 262 is cut by the loss
    (tmp_path / "teacher").mkdir()
    torch.save(sd, tmp_path / "teacher" / "model.pt")
    runs = {}
    for fused in ("auto", False):
        over = {"teacher_checkpointer.checkpoint_dir": str(tmp_path / "teacher"), "fused_loss": fused, **SHORT}
        runs[fused] = _train(tiny_cfg(assets, tmp_path / f"run_{fused}", **over))
    assert runs["auto"]._fused_loss is not None and runs[False]._fused_loss is None
    for r in runs.values():
        assert r.guard.skipped == 0
    for a, b in zip(runs["auto"].metrics_history, runs[False].metrics_history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


# --- 3. resume checks the config --------------------------------------------------------------------------------
def test_resume_keeps_the_run_id_refuses_meaning_changes_and_logs_benign_ones(assets, tmp_path, caplog):
    """Before: a resume with another batch size, lr, seed or epochs was accepted without a word."""
    from tad_torchtune.recipes.kd_tad import KDTADRecipe
    from tad_torchtune.validate import ConfigValidationError

    out = tmp_path / "run"
    _train(tiny_cfg(assets, out, **SHORT))
    first = [read_run_record(p) for p in list_checkpoints(out / "checkpoints")]
    assert len({r["id"] for r in first}) == 1 and all(r["world_size"] == 1 for r in first)
    run_id = first[0]["id"]
    for key, value, old in (("batch_size", 2, 4), ("seed", 7, 0), ("kd_loss.beta", 3.0, 2.0)):
        cfg = tiny_cfg(assets, out, resume_from_checkpoint=True, **{key: value}, **SHORT)
        with pytest.raises(ConfigValidationError, match=rf"{key}: {old} -> {value}.*restore the old values"):
            KDTADRecipe(cfg)  # refused in the constructor: no model, data or process group exists yet
    (problem,) = validate_config(tiny_cfg(assets, out, resume_from_checkpoint=True, **SHORT), world_size=2)
    assert "world size: 1 -> 2 process(es)" in problem.message  # a 1-process run resumed on 2: refused up front
    caplog.set_level(logging.WARNING)
    cfg = tiny_cfg(assets, out, resume_from_checkpoint=True, epochs=2, **{"optimizer.lr": 5e-4}, **SHORT)
    _train(cfg)
    text = caplog.text
    assert "resume: epochs: 1 -> 2 (accepted)" in text and "resume: optimizer.lr: 0.001 -> 0.0005 (accepted)" in text
    assert {read_run_record(p)["id"] for p in list_checkpoints(out / "checkpoints")} == {run_id}


def test_resume_true_with_nothing_yet_starts_at_step_0(assets, tmp_path, caplog, capsys):
    """Before: refused by validation while docs/recipe.md promised a start at step 0 (restart loops need it)."""
    cfg = tiny_cfg(assets, tmp_path / "run", resume_from_checkpoint=True, **SHORT)
    argv = ["--config", str(TINY_CONFIG), f"assets_dir={assets}", f"output_dir={tmp_path / 'run'}"]
    assert validate_main([*argv, "resume_from_checkpoint=true"]) == 0
    assert "has no complete checkpoint yet: the run starts at step 0" in capsys.readouterr().err
    recipe = _train(cfg)
    assert recipe.global_step == 2 and find_latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000002"


def test_skipping_checkpoint_warning_prints_once(assets, tmp_path, caplog):
    """Before: validation and the resume each warned about the same broken checkpoint."""
    out = tmp_path / "run"
    _train(tiny_cfg(assets, out, **SHORT))
    newest = list_checkpoints(out / "checkpoints")[-1]
    (newest / "optimizer.pt").write_bytes(b"truncated")
    caplog.set_level(logging.WARNING)
    recipe = _train(tiny_cfg(assets, out, resume_from_checkpoint=True, epochs=2, **SHORT))
    assert recipe.global_step == 4
    assert caplog.text.count(f"skipping checkpoint {newest}") == 1


# --- 5. validate ------------------------------------------------------------------------------------------------
def test_validate_accepts_tilde_overrides_like_tune_run(assets, tmp_path, capsys):
    """Before: `validate ... ~max_steps_per_epoch` said the override was not key=value."""
    argv = ["--config", str(TINY_CONFIG), f"assets_dir={assets}", f"output_dir={tmp_path / 'o'}"]
    assert validate_main([*argv, "~max_steps_per_epoch", "~peak_flops"]) == 0
    assert capsys.readouterr().out.strip() == "OK"


def test_compare_configs_sorts_keys_into_refused_and_changed():
    old = {"batch_size": 4, "epochs": 1, "optimizer": {"lr": 1e-3, "_component_": "torch.optim.AdamW"}, "x": {"a": 1}}
    new = {"batch_size": 4, "epochs": 3, "optimizer": {"lr": 1e-4, "_component_": "torch.optim.SGD"}, "x": {"a": 1}}
    refused, changed = compare_configs(old, new, 2, 2)
    assert refused == ['optimizer._component_: "torch.optim.AdamW" -> "torch.optim.SGD"']
    assert changed == ["epochs: 1 -> 3", "optimizer.lr: 0.001 -> 0.0001"]
    assert json.dumps(run_record("r", old, 1))  # JSON-serialisable, as the manifest needs
    assert OmegaConf.create(run_record("r", old, 1)["config"]) is not None


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.integration_test
def test_torchrun_workers_stop_when_the_launcher_is_killed(assets, tmp_path):
    """Before: SIGKILL of torchrun's agent left both ranks training unattended, writing checkpoints."""
    from tests.reliability.conftest import REPO_ROOT, subprocess_env

    trace = tmp_path / "trace.jsonl"
    workers: list[int] = []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.reliability.fault_runner", "--config", str(TINY_CONFIG), f"assets_dir={assets}",
           f"output_dir={tmp_path / 'run'}", "epochs=200", "max_steps_per_epoch=4", "save_every_n_steps=50",
           "batch_size=2", "log_peak_memory_stats=false", "log_flops=false"]  # fmt: skip
    agent = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(TEST_TRACE_BATCHES=str(trace)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while (not trace.exists() or len(trace.read_text().splitlines()) < 4) and time.time() < deadline:
            time.sleep(0.2)
        assert trace.exists(), "the workers never reached step 1"
        workers = [c for c in _children(agent.pid) if _alive(c)]
        assert len(workers) == 2, workers
        agent.kill()  # SIGKILL: the agent cannot stop its workers
        agent.wait()
        killed_at = time.time()
        while any(_alive(w) for w in workers) and time.time() - killed_at < 30:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers kept training after their launcher died"
        steps = len(trace.read_text().splitlines()) // 2
        assert steps < 800  # stopped long before the end of the run
        time.sleep(1)
        assert len(trace.read_text().splitlines()) // 2 == steps  # and nothing ran after
    finally:
        if agent.poll() is None:
            agent.kill()
        for w in workers:  # never leave a worker behind, whatever the outcome
            if _alive(w):
                os.kill(w, signal.SIGKILL)
