"""The NeMo-Aligner tier: runs in .venv-aligner (make test-aligner). Workers run as separate
processes (plain, or under torchrun for TP/DP > 1) because NeMo patches and process groups are
per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_worker(script: str, *args: str, nproc: int = 1, timeout: int = 600) -> list[dict]:
    """Run ``tests_aligner/workers/<script>`` with ``nproc`` processes; returns each rank's JSON output."""
    out = Path(args[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # torchrun --standalone binds its rendezvous port itself (port 0) before the workers start: no
    # window in which a port picked here could be taken by another process (a world of one too).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(HERE / "workers" / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]
