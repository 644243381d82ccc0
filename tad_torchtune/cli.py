"""``tad-tune``: torchtune's ``tune`` with our recipes and configs registered, plus our own commands.

``tad-tune ls | cp | run | validate-config ...`` behave exactly like ``tune``'s, with the
``knowledge_distillation_tad`` (and evaluation) recipes and our shipped configs added to the registry.
The commands below are ours; each lives in the module that owns the feature and is imported lazily so
``tad-tune --help`` stays fast. A refused input ends any command with one message and exit code 1, no
traceback (``--debug`` or ``TAD_DEBUG=1`` shows it; ``tad_torchtune.reliability.errors``).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

# name -> (module, function, one-line help). Each function takes ``argv: list[str]`` and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("tad_torchtune.demo", "main", "distil a real small model on CPU, offline: TAD vs KD vs CE (README)"),
    "tokenize": ("tad_torchtune.data.tokenize", "main", "pre-tokenise a corpus into a packed token file"),
    "validate": ("tad_torchtune.validate", "main", "check a recipe config before spending any compute"),
    "diagnose": ("tad_torchtune.eval.diagnostics", "main", "held-out KL, teacher tail mass, argmax-error plots"),
    "export-hf": ("tad_torchtune.models.export", "main", "export a student checkpoint in HF format"),
    "flops": ("tad_torchtune.planning.flops", "main", "FLOPs per token and utilisation projection for a config"),
    "plan": ("tad_torchtune.planning.memory", "main", "per-GPU memory estimate of a config (fits on 80 GB?)"),
    "init-student": ("tad_torchtune.models.student_init", "main", "initialise a Table 8 student from its teacher"),
    "experiment": ("tad_torchtune.experiments.cli", "main", "run a seeded grid of distillation runs, report with CIs"),
    "teacher-cache": (
        "tad_torchtune.offline.teacher_cache_cli",
        "main",
        "run the teacher once, write a sparse cache to train from (teacher_cache=DIR)",
    ),
    "offline": ("tad_torchtune.offline.cli", "main", "run the teacher once: MiniPLM score/select, Seq-KD generate"),
}


def _usage() -> str:
    lines = ["usage: tad-tune <command> [args]", "", "torchtune commands (our recipes and configs registered):"]
    lines.append("  ls, cp, run, download  -- see `tad-tune <command> --help` (`tad-tune validate` is ours, below)")
    lines.append("")
    lines.append("tad_torchtune commands (--debug: show the traceback of a refused input):")
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<13} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:
        # `tad-tune ... | head` ends quietly, as a Unix tool does, instead of a BrokenPipeError traceback.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # torchao 0.15 warns at import that its C++ kernels do not match torch 2.13; torchtune works without them.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not [a for a in argv if a != "--debug"] or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    from tad_torchtune.reliability.errors import DEBUG_ENV, debug_requested, run_reporting

    debug, argv = debug_requested(argv)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # the recipe under `run` (and torchrun's workers) read it
    if argv[0] in SUBCOMMANDS:
        module_name, func_name, _ = SUBCOMMANDS[argv[0]]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                print(f"tad-tune {argv[0]}: not available in this version ({module_name} is missing)", file=sys.stderr)
                return 2
            raise
        return run_reporting(lambda: getattr(module, func_name)(argv[1:]), f"tad-tune {argv[0]}", debug)
    from tad_torchtune._registry import tune_main

    return run_reporting(lambda: tune_main(argv), "tad-tune", debug)


if __name__ == "__main__":
    sys.exit(main())
