"""Run outputs: metrics as JSON lines and TensorBoard scalars, and the Figure 3 plot.

``metrics.jsonl`` holds one object per logged step (``{"step": 3, "train/reward": 0.5, ...}``);
TensorBoard event files go to ``<run_dir>/tensorboard``. On resume the JSONL is cut back to
the checkpoint's step and TensorBoard purges the later events, so a resumed run's logs
equal an uninterrupted run's. A final line cut short by a kill is ignored when reading and
cut off before appending (:mod:`nemo_guide.data.jsonl`); a bad line elsewhere is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nemo_guide.checkpoint import atomic_write_text
from nemo_guide.data.jsonl import prepare_append, read_jsonl

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def reduce_metrics(parts: list[dict[str, Any]], *, sums: tuple[str, ...] = ()) -> dict[str, float]:
    """Combine the metrics of several micro-batches or optimizer steps into floats.

    ``*_min`` keys reduce by min, ``*_max`` by max, keys in ``sums`` by sum, all others by a
    NaN-ignoring mean; a key with no finite value gives NaN. Values may be floats or 0-dim tensors.
    """
    out: dict[str, float] = {}
    for key in sorted({k for p in parts for k in p}):
        values = [float(p[key]) for p in parts if key in p]
        finite = [v for v in values if v == v]
        if not finite:
            out[key] = float("nan")
        elif key.endswith("_min"):
            out[key] = min(finite)
        elif key.endswith("_max"):
            out[key] = max(finite)
        elif key in sums:
            out[key] = sum(finite)
        else:
            out[key] = sum(finite) / len(finite)
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The logged rows of ``run_dir`` (none if it has no metrics file).

    A torn final line (a run killed mid-write) is left out: that step was never logged.

    Raises:
        JsonlError: a bad line before the last one, named by file:line.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return read_jsonl(path, append_only=True).objects()


class MetricsLogger:
    """Appends step metrics to ``metrics.jsonl`` and TensorBoard (if installed)."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        # A torn final line (a kill mid-write) is dropped by the rewrite above or cut off here,
        # so a new row is never glued to a partial one.
        prepare_append(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; tolerate its absence in minimal installs
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def plot_training(run_dir: Path, out: Path | None = None, title: str | None = None) -> Path:
    """The paper's Figure 3 panels over steps: rollout accuracy without guidance (with held-out
    pass@1 and the fraction of prompts guided), token entropy, response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(*series("train/reward"), label="rollout accuracy (no hint)")
    ax.plot(*series("train/guided_frac"), label="prompts guided", alpha=0.6)
    ax.plot(*series("train/reward_guided"), label="guided rollout accuracy", alpha=0.6)
    xs, ys = series("eval/pass1")
    if xs:
        ax.plot(xs, ys, "o-", label="held-out pass@1 (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy without guidance")
    ax.legend(fontsize=8, loc="lower right")
    axes[1].plot(*series("train/entropy"))
    axes[1].set_title("Token entropy (plain rollouts)")
    axes[2].plot(*series("train/response_length"))
    axes[2].set_title("Response length (tokens)")
    for a in axes:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
