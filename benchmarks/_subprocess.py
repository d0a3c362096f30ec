"""The one way the benchmarks run a measurement: a fresh interpreter per spec.

``run_child(script, spec, checkout, threads)`` runs ``python SCRIPT --child JSON`` with
``checkout`` first on ``PYTHONPATH`` (so ``nemo_guide`` comes from that checkout: the
"before" columns) and ``OMP_NUM_THREADS`` set, and returns the JSON object the child printed
last, or ``None`` after saying on stderr why it failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(script: str, spec: dict, checkout: str, threads: int, *, cwd: str | None = None, tail: int = 1) -> dict | None:
    path = [checkout, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(path))
    out = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        print(f"{spec} failed: {out.stderr.strip().splitlines()[-tail:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])
