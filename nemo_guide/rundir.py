"""The run directory's life: checked before anything is written, locked while a run uses it,
tidied after a kill, and reported on when a run is interrupted.

The rules (README, "Resume"):

- **A run** is a directory with a complete checkpoint
  (:func:`~nemo_guide.checkpoint.list_checkpoints`). Starting it again without
  ``run.resume=true`` is refused; ``run.resume=true`` continues from its newest checkpoint,
  after checking it was written by the same config.
- **A run stopped before its first checkpoint** (its outputs or lock file, no complete
  checkpoint) holds nothing to continue: a plain start and ``run.resume=true`` both start it
  over, clearing its outputs (:data:`RUN_OUTPUTS`) and nothing else (an ``eval/`` stays).
- ``run.resume=true`` where no run ever started is refused (most likely a wrong run.name).
- **One process at a time.** A run holds an exclusive ``flock`` on ``<run_dir>/.lock`` for
  its whole life, its pid, host and start time written in the file. Another run of the same
  directory refuses before reading any data and says who holds it. The kernel releases the
  lock of a process that dies, however it dies, so a killed run never blocks the next one.
- **Leftovers of a kill** (``*.tmp-<pid>`` writes and ``*.deleting-<pid>`` checkpoints) are
  removed under the lock when a run starts, in one log line.

``python -m nemo_guide.rundir set-aside DIR`` moves a finished run aside (``make train``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from nemo_guide.checkpoint import config_differences, latest_checkpoint, list_checkpoints, read_checkpoint, remove_leftovers
from nemo_guide.config import Config
from nemo_guide.errors import RunError

LOCK_FILE = ".lock"
RUN_OUTPUTS = ("metrics.jsonl", "tensorboard", "summary.json", "config.json", "training_curves.png")
"""What a run writes next to ``checkpoints/``; cleared when a run is started over."""


class Interrupted(RunError, KeyboardInterrupt):
    """Training stopped by Ctrl-C. A :class:`RunError` (the CLI prints it in one line) that is
    still a ``KeyboardInterrupt`` for callers that catch one."""


class RunLock:
    """The exclusive lock of one run directory (module docstring); ``release`` or use ``with``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock and write this process into the lock file; :class:`RunError` if another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, self.path):
            holder = _holder_text(fd)
            os.close(fd)
            raise RunError(busy_message(self.path.parent, holder))
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S %z")
        os.write(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\nsince={since}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        os.close(fd)
        raise RunError(f"cannot lock {path} ({exc.strerror}); the file system may not support locks: put run.output_dir on a local disk") from None
    return True


def _holder_text(fd: int) -> dict[str, str]:
    raw = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    return dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)


def busy_message(run_dir: Path, holder: dict[str, str]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    return (
        f"{run_dir} is in use by another run: pid {pid} on host {host}, since {holder.get('since', '?')}. "
        f"Wait for it to finish, stop it (kill {pid} on {host}), or pick another run.name; "
        f"the lock ({run_dir / LOCK_FILE}) goes away with that process, so a killed run never blocks"
    )


def lock_holder(run_dir: Path) -> dict[str, str] | None:
    """Who holds ``run_dir``'s lock (``pid``, ``host``, ``since``), or None; creates nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(fd, path):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _holder_text(fd)
    finally:
        os.close(fd)


# -- before, during and after a run ------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What starting a config does to its run directory."""

    run_dir: Path
    checkpoint: Path | None
    """The checkpoint to resume from; None: from scratch."""
    start_over: bool
    """The directory holds a run stopped before its first checkpoint, whose outputs are cleared."""


def plan_run(cfg: Config, *, locked: bool = False) -> Plan:
    """Check the run directory for ``cfg`` (module docstring) without writing anything.

    Args:
        locked: this process holds the lock (do not look for another holder).

    Raises:
        RunError: the directory is in use, holds a run and ``run.resume`` is false, holds no
            run to resume, or its checkpoint was written by another config.
    """
    run_dir, resume = cfg.run.run_dir, cfg.run.resume
    holder = None if locked else lock_holder(run_dir)
    if holder is not None:
        raise RunError(busy_message(run_dir, holder))
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise RunError(
            f"{run_dir} already holds a run ({len(checkpoints)} checkpoint(s), the newest {checkpoints[-1][1].name}); "
            f"continue it with run.resume=true, or pick another run.name, or move the directory aside"
        )
    if checkpoints:
        ckpt = checkpoints[-1][1]
        _, saved = read_checkpoint(ckpt, restore_rng=False)
        diffs = config_differences(saved, cfg.to_dict())
        if diffs:
            raise RunError(f"{ckpt} was written by another config; differences:\n  " + "\n  ".join(diffs) + "\nfix: resume with the original config, or start a new run.name")
        return Plan(run_dir, ckpt, start_over=False)
    outputs = any((run_dir / name).exists() for name in (*RUN_OUTPUTS, "checkpoints"))
    # A lock file alone is a run killed before writing anything (unless it is this process's own).
    if resume and not outputs and not locked and not (run_dir / LOCK_FILE).exists():
        raise RunError(f"run.resume=true but {run_dir} holds no run (no checkpoint, no metrics); start without run.resume, or check run.name / run.output_dir")
    return Plan(run_dir, None, start_over=outputs)


@contextmanager
def run_directory(cfg: Config, log: Callable[[str], None]) -> Iterator[Plan]:
    """Create and lock ``cfg``'s run directory for the ``with`` block (after every check:
    :func:`plan_run`, data). Under the lock it plans again (another run may have finished
    meanwhile), removes the leftovers of killed runs, and clears a run stopped before its
    first checkpoint."""
    run_dir = cfg.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        plan = plan_run(cfg, locked=True)
        removed = remove_leftovers(run_dir)
        if removed:
            log(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(str(p.relative_to(run_dir)) for p in removed)}")
        if plan.start_over:
            cleared = clear_outputs(run_dir)
            log(f"{run_dir} holds a run stopped before its first checkpoint: starting it over" + (f" (cleared {', '.join(cleared)})" if cleared else ""))
        yield plan


def clear_outputs(run_dir: Path) -> list[str]:
    """Delete the :data:`RUN_OUTPUTS` of ``run_dir``; returns the names deleted."""
    cleared = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        cleared.append(name)
    return cleared


@contextmanager
def interrupts_as_errors(run_dir: Path) -> Iterator[None]:
    """Turn Ctrl-C inside the block into :class:`Interrupted`, whose message says how to continue.
    Inner ``with`` blocks (logger, reward workers, lock) have closed by the time it is raised."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(run_dir)) from None


def interrupted_message(run_dir: Path) -> str:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return f"interrupted before the first checkpoint of {run_dir}: nothing to resume; run the same command again to start over"
    return f"interrupted; the last complete checkpoint is {ckpt}: continue with the same command plus run.resume=true"


def set_aside(run_dir: Path) -> Path | None:
    """Rename ``run_dir`` to ``<run_dir>.prev-<timestamp>`` (refused while a run holds it);
    None when it does not exist."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}-{n}")
    with RunLock(run_dir):
        os.rename(run_dir, target)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "set-aside":
        print("usage: python -m nemo_guide.rundir set-aside RUN_DIR", file=sys.stderr)
        return 2
    try:
        moved = set_aside(Path(argv[1]))
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if moved is not None:
        print(f"the previous run {argv[1]} was moved to {moved}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
