"""Implementations of ``nemo-guide`` subcommands kept out of ``cli.py`` (which stays a thin
parser): :func:`add_commands` registers them on the CLI's subparsers."""

from __future__ import annotations

import argparse


def _positive_float(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        out = -1.0
    if out <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive number of GiB")
    return out


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number >= 1")
    return int(value)


def add_commands(sub) -> None:
    """``plan``, ``doctor`` and ``experiment``."""
    from nemo_guide.commands.doctor import run_doctor
    from nemo_guide.commands.experiment import run_experiment
    from nemo_guide.commands.plan import run_plan

    p = sub.add_parser("plan", help="per-GPU memory and tokens per step of a NeMo-Aligner run config, and whether it fits (no GPU needed)")
    p.add_argument("config", help="a NeMo-Aligner run config, e.g. conf/aligner/qwen2_5_72b.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.micro_batch_size=2")
    p.add_argument("--nodes", type=_positive_int, default=None, help="nodes (default: trainer.num_nodes)")
    p.add_argument("--gpus-per-node", type=_positive_int, default=None, help="GPUs per node (default: trainer.devices)")
    p.add_argument("--gpu-memory", type=_positive_float, default=80.0, help="GiB per GPU (default 80; an 80 GB H100 shows 79.1)")
    p.add_argument("--json", action="store_true", help="one JSON object (keys documented in nemo_guide/planner/__init__.py)")
    p.set_defaults(func=run_plan, parser=p)

    p = sub.add_parser("doctor", help="versions of the NeMo-Aligner stack here and which plugin features are usable (runs on CPU)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--no-import", action="store_true", help="versions from package metadata only; skip the import probes (image builds)")
    p.add_argument("--check-pins", action="store_true", help="exit 1 unless NeMo, NeMo-Aligner, megatron-core and TensorRT-LLM have the pinned versions")
    p.set_defaults(func=run_doctor, parser=p)

    p = sub.add_parser("experiment", help="a grid of `nemo-guide train` runs (config keys x seeds) and one report of tables over seeds")
    p.add_argument("grid", help="the grid file, e.g. conf/experiments/paper.yaml (format: nemo_guide/experiment/grid.py)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="runs at once, each in its own process (default 1)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per run (default: CPU cores / --jobs)")
    p.add_argument("--resume", action="store_true", help="continue a grid directory: skip finished runs, resume the others")
    p.add_argument("--out", default=None, help="output directory instead of the grid's output_dir")
    p.add_argument("--check", action="store_true", help="check the grid file and list its runs; run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished runs; run nothing")
    p.set_defaults(func=run_experiment, parser=p)
