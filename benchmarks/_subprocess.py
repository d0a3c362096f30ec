"""The one way the benchmarks run a measurement: a fresh interpreter per spec.

``run_child(script, spec, checkout, threads)`` runs ``python SCRIPT --child JSON`` with
``checkout`` first on ``PYTHONPATH`` (so ``nemo_guide`` comes from that checkout: the
"before" columns) and ``OMP_NUM_THREADS`` set, and returns the JSON object the child printed
last, or ``None`` after saying on stderr why it failed. ``add_benchmark_arguments``
(``--rounds``, ``--repeats``, ``--threads``, ``--before``, ``--child``) and ``parse_or_run_child``
are the scripts' side of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_child(script: str, spec: dict, checkout: str, threads: int, *, cwd: str | None = None, tail: int = 1) -> dict | None:
    path = [checkout, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(path))
    out = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        print(f"{spec} failed: {out.stderr.strip().splitlines()[-tail:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_benchmark_arguments(parser, *, repeats_help: str, before_help: str) -> None:
    """The options every benchmark shares: ``--rounds`` (interleaved, medians over them),
    ``--repeats`` (timed runs per subprocess), ``--threads``, ``--before PATH`` (another checkout
    measured side by side) and the hidden ``--child JSON``."""
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; tables show medians over them")
    parser.add_argument("--repeats", type=int, default=3, help=repeats_help)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS) of every run")
    parser.add_argument("--before", metavar="PATH", help=before_help)
    parser.add_argument("--child", help=argparse.SUPPRESS)


def parse_or_run_child(parser, run_one):
    """The parsed arguments of the parent, or None in a child, which has printed the JSON of
    ``run_one(**spec)`` (what :func:`run_child` reads). Refuses a ``--before`` with no package."""
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return None
    if args.before and not (Path(args.before) / "nemo_guide").is_dir():
        parser.error(f"--before {args.before}: no nemo_guide package there; give a checkout's root directory")
    return args
