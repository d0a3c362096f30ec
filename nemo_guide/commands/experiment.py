"""``nemo-guide experiment GRID [--jobs N] [--resume] [--check] [--report-only]``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def run_experiment(args: argparse.Namespace) -> int:
    from nemo_guide.experiment.grid import load_grid
    from nemo_guide.experiment.report import write_report
    from nemo_guide.experiment.runner import read_grid_state, run_args, run_grid

    grid = load_grid(args.grid)
    if args.out:
        grid = dataclasses.replace(grid, output_dir=Path(args.out))
    if args.check:
        for run in grid.runs:
            print(f"{run.name}: {'eval only ' if run.eval_only else ''}{' '.join(run_args(grid, run))}")
        print(f"{len(grid.runs)} runs; output in {grid.output_dir}")
        return 0
    if args.report_only:
        for path in write_report(grid, read_grid_state(grid)):
            print(f"wrote {path}")
        return 0
    run_grid(grid, jobs=args.jobs, resume=args.resume, threads=args.threads)
    print((grid.output_dir / "report.md").read_text())
    return 0
