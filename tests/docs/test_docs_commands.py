"""The shell commands of README.md and docs/*.md, run as written where they can run offline on a CPU.

Every command in a ``bash``/``sh``/``console`` block (and every ``$ `` line of an untyped block) is extracted,
continuation lines joined. Each is either run, in document order, in one scratch folder (tiny assets made by
the test first; ``configs/`` linked in, as in a checkout; ``/tmp/`` mapped into the scratch folder; hub
access switched off), or listed with the reason it is not run: it needs a GPU, downloaded models or data, or
the hub, sets up an environment, runs the test suite itself, or names the user's own files. Where a block
shows a command's output (``$ command`` then its lines), the printed output must equal it.

``python -m pytest -s -k docs tests/docs`` prints the inventory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# First match wins: (pattern on the joined command, None = run it, or the reason it is not run).
RULES: list[tuple[str, str | None]] = [
    (r"\bpip install\b|python3? -m venv", "environment set-up (installs packages)"),
    (r"python -m pytest", "runs the test suite itself"),
    (r"^tad-tune demo\b|\btad_demo/", "the SmolLM2 demo: minutes and GBs of RAM (tests/demo covers it)"),
    (
        r"^tad-tune experiment (run|report) (tad_vs_kd|offline_cpu|on_policy_cpu|experiments/)",
        "a shipped experiment grid: hours on CPU or a GPU (tests/experiments runs a tiny grid)",
    ),
    (r"benchmarks/benchmark_offline\.py", "minutes of CPU with the demo's SmolLM2 teacher (a benchmark)"),
    (r"benchmarks/on_policy_demo\.py", "the on-policy demo comparison: about 30 min on a CPU"),
    (r"^tad-tune plan ", None),  # memory arithmetic: runs for paper configs too
    (r"^tad-tune flops ", None),
    (
        r"(?<![\w/])\.\.\.|configs/my_run\.yaml|OUTPUT_DIR|heldout\.jsonl|(?<![\w/])runs/|heldout_kl_TAD\.csv",
        "placeholder for the user's own files",
    ),
    (r"qwen2/1\.5_to_0\.5B|--tasks hellaswag|--source sail/", "downloads from the hub"),
    (r"--config (configs/)?(qwen|phi|gemma|eval_commonsense|eval_math)", "paper-scale config: GPU, downloaded models"),
    (r"(?<![\w.])/(models|data|runs)/", "needs downloaded models or data"),
]
TINY_RUN = re.compile(r"(kd_tad|knowledge_distillation_tad)\b.*--config (configs/)?tiny_cpu\b")


@dataclass
class Unit:
    """One command (or one block run as a script, when it has shell control flow)."""

    file: str
    line: int
    text: str
    commands: int = 1
    expected: list[str] | None = None
    reason: str | None = None
    allowed_rc: tuple[int, ...] = (0,)
    result: str = ""
    output: str = field(default="", repr=False)


def _join(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out, cur, start = [], "", None
    for no, line in lines:
        if start is None:
            start = no
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append((start, cur + line))
        cur, start = "", None
    return out


def _strip_comment(cmd: str) -> tuple[str, str]:
    """(command, trailing comment) -- a ``#`` outside quotes that follows whitespace starts the comment."""
    quote = None
    for i, ch in enumerate(cmd):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and (i == 0 or cmd[i - 1].isspace()):
            return cmd[:i].rstrip(), cmd[i + 1 :].strip()
    return cmd.rstrip(), ""


def extract() -> list[Unit]:
    units: list[Unit] = []
    for path in DOC_FILES:
        rel = str(path.relative_to(REPO))
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            lang, start = m.group(1), i + 1
            j = start
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body = [(n + 1, lines[n]) for n in range(start, j)]
            i = j + 1
            if lang in ("bash", "sh", "shell", "console"):
                code = [(n, t) for n, t in body if t.strip() and not t.lstrip().startswith("#")]
                joined = _join(code)
                if any(re.match(r"\s*(for|while|if)\b", t) for _, t in joined):
                    text = "\n".join(t for _, t in body)
                    units.append(Unit(rel, body[0][0], text, commands=len(joined)))
                    continue
                for no, t in joined:
                    units.append(Unit(rel, no, t.strip()))
            elif not lang and not any(t.startswith("$ ") for _, t in body):
                # usage lines in plain blocks (docs/reliability.md): a line that starts with our commands
                for no, t in _join(body):
                    if re.match(r"(tad-tune|tune) \w", t):
                        units.append(Unit(rel, no, t.strip()))
            elif not lang:
                cur: Unit | None = None
                for no, t in body:
                    if t.startswith("$ "):
                        cur = Unit(rel, no, t[2:].strip(), expected=[])
                        units.append(cur)
                    elif cur is not None:
                        cur.expected.append(t.rstrip())
    for u in units:
        cmd, comment = _strip_comment(u.text) if u.commands == 1 else (u.text, "")
        u.text = cmd
        if "exit status 1" in comment:
            u.allowed_rc = (0, 1)
        for pattern, reason in RULES:
            if re.search(pattern, cmd, re.M):
                u.reason = reason
                break
    return units


def _prepare(cmd: str, sandbox: Path) -> str:
    cmd = re.sub(r"\s\[[^\]]*\]", "", cmd)  # [--optional flags] of usage lines
    cmd = cmd.replace("/tmp/", f"{sandbox}/tmp/")
    # the shipped tiny config writes to /tmp/tad_tiny_run unless told: keep runs inside the sandbox
    lines = []
    for line in cmd.split("\n"):
        if TINY_RUN.search(line) and "output_dir=" not in line:
            line += f" output_dir={sandbox}/tmp/tad_tiny_run"
        lines.append(line)
    return "\n".join(lines)


def test_every_command_is_run_or_listed_with_a_reason():
    units = extract()
    run = [u for u in units if u.reason is None]
    listed = [u for u in units if u.reason is not None]
    print(f"\n{sum(u.commands for u in run)} commands run, {sum(u.commands for u in listed)} listed as not run:")
    for u in listed:
        print(f"  {u.file}:{u.line}  [{u.reason}]  {u.text.splitlines()[0][:100]}")
    assert run and all(u.reason for u in listed)
    # the offline walk-throughs are among the ones run
    assert any("tad_torchtune.testing.tiny" in u.text for u in run if u.file == "README.md")
    assert any(u.file == "docs/eval.md" and u.commands > 1 for u in run)


@pytest.mark.slow
@pytest.mark.integration_test
def test_doc_commands_run_as_written(tmp_path):
    sandbox = tmp_path / "sandbox"
    (sandbox / "tmp").mkdir(parents=True)
    (sandbox / "configs").symlink_to(REPO / "configs")
    from tad_torchtune.testing.tiny import write_tiny_assets

    write_tiny_assets(sandbox / "tmp" / "tad_tiny")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if shutil.which("tad-tune", path=env["PATH"]) is None:
        pytest.fail("tad-tune is not on PATH next to this Python; install the project (pip install -e .)")
    units = [u for u in extract() if u.reason is None]
    failures = []
    for u in units:
        proc = subprocess.run(
            ["bash", "-c", "set -e\n" + _prepare(u.text, sandbox)],
            cwd=sandbox,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        u.output = proc.stdout
        if proc.returncode not in u.allowed_rc:
            u.result = f"exit {proc.returncode}"
            failures.append(f"{u.file}:{u.line} {u.text[:200]}\n  exit {proc.returncode}: {proc.stderr[-1500:]}")
        elif u.expected is not None and [x.rstrip() for x in proc.stdout.splitlines()] != u.expected:
            u.result = "output differs"
            failures.append(
                f"{u.file}:{u.line} {u.text}\n  printed:\n{proc.stdout}\n  docs show:\n" + "\n".join(u.expected)
            )
        else:
            u.result = "ok"
    n_ok = sum(u.commands for u in units if u.result == "ok")
    print(f"\n{sum(u.commands for u in units)} commands run: {n_ok} as documented, {len(failures)} units failed")
    assert not failures, "\n\n".join(failures)
