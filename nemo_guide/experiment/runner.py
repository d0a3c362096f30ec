"""``nemo-guide experiment GRID.yaml [--jobs N] [--resume]``: run a grid, then write its report.

Each run is a job process (:mod:`nemo_guide.experiment.job`) writing a normal run directory
``<output_dir>/runs/<name>``; ``--jobs N`` runs N at once, each with a fair share of the CPU
threads (``--threads`` overrides). A run is finished when its ``experiment/done.json``
exists and was made by the same arguments; ``--resume`` skips finished runs and continues
the others (training from the newest checkpoint). Without ``--resume`` a directory that
already holds runs is refused. The grid holds ``<output_dir>/.grid.lock`` while it runs,
and its job processes die with it (``PR_SET_PDEATHSIG``), so a killed grid leaves no
orphans holding run locks. The report (:mod:`nemo_guide.experiment.report`) is written at
the end, also after failed runs (their cells are empty), and ``--report-only`` rewrites it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from nemo_guide.errors import RunError
from nemo_guide.experiment.grid import Grid, Run
from nemo_guide.experiment.job import DONE, EXPERIMENT_DIR, GRID_STATE, read_document

Log = Callable[[str], None]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def runs_dir(grid: Grid) -> Path:
    return grid.output_dir / "runs"


def run_args(grid: Grid, run: Run) -> list[str]:
    """The ``key=value`` arguments of a run (the grid's ``set``, the row's, seed, name, directory)."""
    return [*run.override_args(grid.common), f"run.name={run.name}", f"run.output_dir={runs_dir(grid)}"]


def read_grid_state(grid: Grid) -> dict:
    """``<output_dir>/grid.json``: every invocation of the grid (start, jobs, threads, runs, wall time)."""
    return read_document(grid.output_dir / GRID_STATE) or {"invocations": []}


def is_finished(grid: Grid, run: Run) -> bool:
    """Whether ``done.json`` exists; refuses one written by other arguments (the grid changed)."""
    done = runs_dir(grid) / run.name / EXPERIMENT_DIR / DONE
    if not done.exists():
        return False
    saved = read_document(done).get("args")
    if saved != run_args(grid, run):
        raise RunError(
            f"{done} was made with other arguments than the grid now gives run {run.name}:\n  saved: {saved}\n  now:   {run_args(grid, run)}\n"
            f"fix: restore the grid file, or give it another output_dir (or move {runs_dir(grid) / run.name} aside)"
        )
    return True


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _job(grid: Grid, run: Run, threads: int) -> dict:
    return {
        "name": run.name, "base": str(grid.base), "args": run_args(grid, run), "run_dir": str(runs_dir(grid) / run.name),
        "eval_only": run.eval_only, "progress": run.progress, "progress_k": grid.progress_k, "threads": threads,
        "eval": {"samples": grid.eval.samples, "k": list(grid.eval.k), "limit": grid.eval.limit, "with_hints": grid.eval.with_hints},
    }


def _launch(grid: Grid, run: Run, threads: int, log: Log) -> tuple[Run, int, float]:
    logs = grid.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_file = logs / f"{run.name}.job.json"
    job_file.write_text(json.dumps(_job(grid, run, threads), indent=1))
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(logs / f"{run.name}.log", "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start\n")
        out.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "nemo_guide.experiment.job", str(job_file)],
            stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent, check=False,
        )
    seconds = time.time() - start
    log(f"{'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}: {run.name} in {seconds:.0f} s"
        + ("" if proc.returncode == 0 else f"; see {logs / (run.name + '.log')}"))
    return run, proc.returncode, seconds


def run_grid(grid: Grid, *, jobs: int = 1, resume: bool = False, threads: int | None = None, log: Log = _say) -> dict:
    """Run every unfinished run of ``grid``, then write the report; returns the grid state.

    Raises:
        RunError: the directory holds runs and ``resume`` is false, another grid process
            holds it, or a finished run was made by other arguments.
    """
    from nemo_guide.experiment.report import write_report

    if jobs < 1:
        raise RunError(f"--jobs {jobs}: give 1 or more")
    grid.output_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(grid.output_dir / ".grid.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise RunError(f"{grid.output_dir} is used by another `nemo-guide experiment` process; wait for it or stop it") from None
    try:
        existing = sorted(p.name for p in runs_dir(grid).iterdir()) if runs_dir(grid).exists() else []
        if existing and not resume:
            raise RunError(
                f"{grid.output_dir} already holds {len(existing)} run(s) of an earlier grid ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}); continue with --resume (finished runs are skipped), or give another output_dir"
            )
        finished = [run for run in grid.runs if is_finished(grid, run)]
        pending = [run for run in grid.runs if run not in finished]
        per_job = threads or max(1, (os.cpu_count() or 1) // jobs)
        log(f"grid {grid.path.name}: {len(grid.runs)} runs, {len(finished)} finished, {len(pending)} to run, "
            f"{jobs} at a time with {per_job} thread(s) each; logs in {grid.output_dir / 'logs'}")
        state = read_grid_state(grid)
        invocation = {"started": time.time(), "jobs": jobs, "threads": per_job, "ran": [], "failed": [], "skipped": [r.name for r in finished]}
        state["invocations"].append(invocation)
        start = time.time()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for run, rc, seconds in pool.map(lambda r: _launch(grid, r, per_job, log), pending):
                (invocation["ran"] if rc == 0 else invocation["failed"]).append({"name": run.name, "seconds": seconds, "exit": rc})
        invocation["wall_seconds"] = time.time() - start
        invocation["machine"] = _machine()
        state_path = grid.output_dir / GRID_STATE
        tmp = state_path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_path)
        paths = write_report(grid, state)
        log(f"wrote {', '.join(str(p) for p in paths)} ({invocation['wall_seconds'] / 60:.1f} min for {len(pending)} run(s))")
        if invocation["failed"]:
            raise RunError(
                f"{len(invocation['failed'])} run(s) failed: {', '.join(f['name'] for f in invocation['failed'])}; "
                f"see {grid.output_dir / 'logs'}; after fixing, rerun with --resume"
            )
        return state
    finally:
        os.close(lock)


def _machine() -> dict:
    import platform

    import torch

    return {
        "cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "load_average_at_end": list(os.getloadavg()),
    }
