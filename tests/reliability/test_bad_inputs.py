"""Every refused input ends in one clear message: the table of ``tests/reliability/bad_inputs.py``, row by row.

In-process through ``tad_torchtune.cli.main`` (the recipe through ``tune run``'s runpy, as on the command line):
each row must exit non-zero with the expected words, no traceback, and leave every existing file as it was.
A few rows run as real subprocesses (``tune run``, ``tad-tune``) to check what a shell sees, and that
``--debug`` / ``TAD_DEBUG=1`` bring the traceback back.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.bad_inputs import ROWS, build_world, classify, hold_lock, run_row, snapshot
from tests.reliability.conftest import REPO_ROOT, TINY_CONFIG, subprocess_env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("name,argv,words", ROWS, ids=[r[0] for r in ROWS])
def test_refused_input_is_one_clear_message(world, name, argv, words):
    ctx = hold_lock(world / "locked") if "in use" in " ".join(words) else contextlib.nullcontext()
    with ctx:  # the snapshot after the holder wrote its lock file: only the command's own writes count
        before = snapshot(world)
        code, out = run_row(argv, world)
    verdict = classify(code, out, words, before, snapshot(world))
    assert verdict == "clear", f"{name}: {verdict}, exit {code}\n{out[-3000:]}"
    assert code == 1
    assert not (world / "PWNED").exists()  # no pickle payload ever ran


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=240)


@pytest.mark.integration_test
@pytest.mark.slow  # three real command lines, each importing torch and torchtune (~10 s each on 2 busy cores)
def test_tune_run_prints_one_line_and_debug_shows_the_traceback(world):
    recipe = ["--config", str(TINY_CONFIG), f"assets_dir={world / 'assets'}", f"output_dir={world / 'sub_out'}"]
    tune = str(Path(sys.executable).parent / "tune")
    proc = _cli([tune, "run", "tad_torchtune.recipes.kd_tad", *recipe, "clip_grad_norm=.nan"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-2:] == [
        "  - clip_grad_norm: must be a finite number, got nan; use e.g. 1.0, or null for no clipping",
        "(add --debug or set TAD_DEBUG=1 for the traceback)",
    ]
    tad_tune = [sys.executable, "-m", "tad_torchtune.cli"]
    proc = _cli([*tad_tune, "--debug", "run", "knowledge_distillation_tad", *recipe, "seed=abc"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigValidationError" in proc.stderr
    proc = _cli([sys.executable, "-m", "tad_torchtune.recipes.kd_tad", *recipe, "seed=abc"], TAD_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "seed: must be an integer, got 'abc'" in proc.stderr
    assert not (world / "sub_out").exists()


def test_describe_turns_errors_into_one_line_and_an_exit_code():
    from types import SimpleNamespace

    from tad_torchtune.reliability.errors import EXIT_INTERNAL, EXIT_REFUSED, describe

    msg, code = describe(ValueError("seed: must be an integer, got 'abc'"))
    assert code == EXIT_REFUSED and msg.startswith("seed: must be an integer, got 'abc' (add --debug")
    msg, code = describe(KeyError("x"))
    assert code == EXIT_INTERNAL and msg.startswith("unexpected error KeyError: 'x'")
    msg, code = describe(StopIteration())
    assert code == EXIT_INTERNAL and "StopIteration" in msg

    class ChildFailedError(Exception):  # torchrun's agent: one worker refused, the other got its SIGTERM
        failures = {0: SimpleNamespace(exitcode=-15), 1: SimpleNamespace(exitcode=1)}

    msg, code = describe(ChildFailedError("====\nlong table"))
    assert (
        code == EXIT_REFUSED and msg == "a worker refused the input (its message is above); torchrun stopped the others"
    )
    ChildFailedError.failures = {0: SimpleNamespace(exitcode=3)}
    assert describe(ChildFailedError())[1] == EXIT_INTERNAL


def test_output_cut_short_by_a_pipe_is_not_a_traceback():
    """`tad-tune --help | head -1` printed a BrokenPipeError traceback once head had closed the pipe."""
    shell = f"{sys.executable} -m tad_torchtune.cli --help | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.stdout.startswith("usage: tad-tune")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
