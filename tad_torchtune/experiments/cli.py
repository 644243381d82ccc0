"""``tad-tune experiment run GRID`` and ``tad-tune experiment report DIR`` (``docs/experiments.md``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tad_torchtune.experiments.grid import GridError, load_grid, shipped_grids
from tad_torchtune.reliability.errors import EXIT_REFUSED


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N with 0 <= I < N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard takes I/N with 0 <= I < N, got {text!r}")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tad-tune experiment",
        description="Seeded, resumable grids of real recipe runs (variants x seeds) and their report: means, "
        "standard deviations and paired differences with 95%% confidence intervals, CSV and PNG.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run (or resume) a grid",
        description="Run every unfinished run of a grid; finished runs are skipped, interrupted ones resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("grid", help=f"a grid file, or a shipped grid: {', '.join(shipped_grids())}")
    run.add_argument("--out", type=Path, default=None, help="grid folder; default ./experiments/<grid name>")
    run.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: run every N-th run from the I-th")
    run.add_argument("--only", default=None, help="comma-separated variant names to run (others are left)")
    run.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints and weights")
    run.add_argument("--report", action="store_true", help="write the report when the runs are done")
    rep = sub.add_parser(
        "report",
        help="tables, paired confidence intervals and plots of a grid folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rep.add_argument("folder", type=Path, help="the grid folder (--out of `run`)")
    rep.add_argument("--to", type=Path, default=None, help="where CSV/PNG/Markdown go; default FOLDER/report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "run":
            from tad_torchtune.experiments.runner import run_grid

            spec = load_grid(args.grid)
            only = None
            if args.only:
                only = {x.strip() for x in args.only.split(",")}
                unknown = sorted(only - {v.name for v in spec.variants})
                if unknown:
                    raise GridError(f"--only: no variant {unknown[0]!r} in grid {spec.name!r}")
            out = args.out or Path("experiments") / spec.name
            results = run_grid(
                spec, out, shard=args.shard, only=only, max_runs=args.max_runs, keep_checkpoints=args.keep_checkpoints
            )
            print(f"{len(results)} finished runs in {out}")
            if args.report:
                from tad_torchtune.experiments.report import write_report

                print(f"report: {write_report(out)}")
        else:
            from tad_torchtune.experiments.report import write_report

            if not (args.folder / "grid.yaml").is_file():
                raise GridError(f"{args.folder} is not a grid folder (no grid.yaml); give the --out of `run`")
            print(f"report: {write_report(args.folder, args.to)}")
    except GridError as err:
        print(f"tad-tune experiment: {err}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
