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
import os
import time
from pathlib import Path
from typing import Any, Callable

from nemo_guide.checkpoint import TMP_MARK, atomic_write_text
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

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepReport:
    """How a run shows its steps: a tqdm bar, or without one (``progress=False``) a log line
    (step, reward, guided fraction, s/step, eta) every ``every`` steps (default: 20 lines a
    run), at the last step, and whenever ``seconds`` have passed since the previous line."""

    def __init__(
        self,
        name: str,
        total: int,
        initial: int,
        *,
        progress: bool,
        log: Callable[[str], None],
        every: int | None = None,
        seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.initial, self.log, self.clock = total, initial, log, clock
        self.every, self.seconds = every or max(1, total // 20), seconds
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)
        self.start = self.last = clock()

    def step(self, step: int, metrics: dict[str, float]) -> None:
        reward, guided = metrics["train/reward"], metrics["train/guided_frac"]
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{reward:.2f}", guided=f"{guided:.2f}", refresh=False)
            self.bar.update(1)
            return
        now = self.clock()
        if step % self.every and step != self.total and now - self.last < self.seconds:
            return
        self.last = now
        per_step = (now - self.start) / max(1, step - self.initial)
        eta = _duration(per_step * (self.total - step))
        self.log(f"step {step}/{self.total}: reward {reward:.2f}, guided {guided:.2f}, {per_step:.2f} s/step, eta {eta}")

    def write(self, message: str) -> None:
        """A message between the bar's updates (or a log line)."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.log(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> StepReport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """``"45s"``, ``"3m05s"``, ``"2h07m"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plot_training(run_dir: Path, out: Path | None = None, title: str | None = None) -> Path:
    """Draw :func:`training_figure` of ``run_dir``'s metrics to ``out`` (default ``training_curves.png``),
    written under a temporary name and renamed, so a kill never leaves half an image."""
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fig = training_figure(read_metrics(run_dir), title)
    import matplotlib.pyplot as plt

    tmp = out.with_name(out.name + f"{TMP_MARK}{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def training_figure(rows: list[dict[str, Any]], title: str | None = None):
    """The paper's Figure 3 panels over steps (a matplotlib Figure): rollout accuracy without
    guidance (with the fraction of prompts guided); held-out greedy pass@1, overall and per kind
    of problem (``eval/pass1_<kind>``: known and novel operators in the main job); token entropy;
    response length. Entropy and length start their y axis at 0 and show a rolling mean over
    the raw series (drawn faint), so a one-token change does not look like a spike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    ax.plot(*series("train/reward"), label="rollout accuracy (no hint)")
    ax.plot(*series("train/guided_frac"), label="prompts guided", alpha=0.6)
    ax.plot(*series("train/reward_guided"), label="guided rollout accuracy", alpha=0.6)
    ax.set_title("Accuracy without guidance (training)")
    ax = axes[1]
    kinds = sorted({k[len("eval/pass1_"):] for r in rows for k in r if k.startswith("eval/pass1_")})
    for key, label, style in [("eval/pass1", "all", "o-"), *((f"eval/pass1_{kind}", kind, "s--") for kind in kinds)]:
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, style, label=f"held-out pass@1, {label}", markersize=4)
    ax.set_title("Held-out pass@1 (greedy, no hint)")
    for ax in axes[:2]:
        ax.set_ylim(-0.02, 1.02)
        if ax.get_lines():
            ax.legend(fontsize=8, loc="lower right")
    for ax, key, name in ((axes[2], "train/entropy", "Token entropy (plain rollouts)"), (axes[3], "train/response_length", "Response length (tokens)")):
        xs, ys = series(key)
        ax.plot(xs, ys, alpha=0.25, label="per step")
        ax.plot(xs, rolling_mean(ys, max(1, len(ys) // 20)), label=f"rolling mean ({max(1, len(ys) // 20)} steps)")
        ax.set_ylim(bottom=0, top=max(ys, default=1.0) * 1.1 or 1.0)
        ax.set_title(name)
        ax.legend(fontsize=8, loc="best")  # entropy falls towards 0, lengths sit near the top
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
