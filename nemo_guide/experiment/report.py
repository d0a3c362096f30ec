"""The report of a grid: ``report.md``, ``report.json`` and the progress figures.

A table cell is the mean +- sample standard deviation over the seeds of a row, followed by
the per-seed values in seed order; a seed whose run did not finish (or lacks the metric)
is shown as ``-`` and left out of the mean. Metrics (:data:`~nemo_guide.experiment.grid.METRIC_HELP`)
come from each run's ``experiment/done.json`` (final evaluation), ``metrics.jsonl`` and
``summary.json``.

Figures (with a ``progress`` section): ``progress.png``, the Figure 1 analogue (problems
solved by greedy pass@1 at each checkpoint that the initial policy did not solve, split
into self-distillation (initial pass@k > 0) and capability gain (initial pass@k = 0), mean
over seeds), and ``pass_at_k.png``, the Figure 2 analogue (the initial policy's pass@k
with and without the hint on the problems each row's final policy gained, by kind of gain).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from nemo_guide.experiment.grid import Grid, Run, Table
from nemo_guide.experiment.job import DONE, EXPERIMENT_DIR, read_document


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from nemo_guide.data.jsonl import read_jsonl

    return read_jsonl(path, append_only=True).objects() if path.exists() else []


def metric_value(run_dir: Path, metric: str, cache: dict[Path, Any]) -> float | None:
    """One metric of one finished run (``None`` when the run or the metric is missing)."""
    parts = metric.split(".", 2)
    if parts[0] == "eval":
        done = _cached(cache, run_dir / EXPERIMENT_DIR / DONE, read_document)
        if done is None:
            return None
        value = done["eval"].get(parts[2], {}).get(parts[1])
        return None if value is None else float(value)
    if parts[0] == "train":
        rows = _cached(cache, run_dir / "metrics.jsonl", _read_jsonl)
        values = [float(r[parts[2]]) for r in rows if isinstance(r.get(parts[2]), (int, float))]
        values = [v for v in values if math.isfinite(v)]
        if not values:
            return None
        agg = parts[1]
        return {"first": values[0], "last": values[-1], "mean": sum(values) / len(values), "min": min(values), "max": max(values)}[agg]
    node: Any = _cached(cache, run_dir / "summary.json", read_document)
    for key in metric.split(".")[1:]:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _cached(cache: dict[Path, Any], path: Path, load) -> Any:
    if path not in cache:
        cache[path] = load(path)
    return cache[path]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def table_data(grid: Grid, table: Table, cache: dict[Path, Any]) -> list[dict[str, Any]]:
    runs = grid.output_dir / "runs"
    rows = []
    for row in table.rows:
        cells = {}
        for label, metric in table.columns:
            values = [metric_value(runs / grid.run_for(row, seed).name, metric, cache) for seed in grid.seeds]
            have = [v for v in values if v is not None]
            entry: dict[str, Any] = {"metric": metric, "values": values}
            if have:
                entry["mean"], entry["std"] = mean_std(have)
            cells[label] = entry
        rows.append({"label": row.label, "runs": [grid.run_for(row, s).name for s in grid.seeds], "cells": cells})
    return rows


def _fmt(x: float | None, like: float | None = None) -> str:
    """Two decimals (none from 100 on), scientific below 0.01 or from 1e4; ``like``: format a
    spread the way its mean is formatted (``0.98 ± 0.01``, not ``0.98 ± 9.62e-03``)."""
    if x is None:
        return "-"
    ref = x if like is None else like
    if ref != 0 and (abs(ref) < 1e-2 or abs(ref) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.2f}" if abs(ref) < 100 else f"{x:.0f}"


def markdown_table(table: Table, rows: list[dict[str, Any]]) -> str:
    labels = [label for label, _ in table.columns]
    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines += ["| row | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for row in rows:
        cells = []
        for label in labels:
            c = row["cells"][label]
            if "mean" not in c:
                cells.append("-")
                continue
            per = ", ".join(_fmt(v) for v in c["values"])
            cells.append(f"{_fmt(c['mean'])} ± {_fmt(c['std'], c['mean'])} ({per})")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress_data(grid: Grid) -> dict[str, Any]:
    """Per progress row: per seed, per checkpoint step, the Eq. 1-2 decomposition (fractions of problems)."""
    out: dict[str, Any] = {}
    for table in grid.tables:
        for row in table.rows:
            key = f"{table.name}/{row.label}"
            if key not in grid.progress_rows:
                continue
            seeds = {}
            for seed in grid.seeds:
                done = grid.output_dir / "runs" / grid.run_for(row, seed).name / EXPERIMENT_DIR / DONE
                if not done.exists():
                    continue
                steps = []
                for entry in read_document(done).get("progress", []):
                    a = entry["analysis"]
                    counts, n = a["effective"]["counts"], a["problems"]
                    steps.append({
                        "step": entry["step"], "pass1": a["pass1_after"],
                        "self_distillation": counts["distillation"] / n, "capability_gain": counts["capability_gain"] / n,
                        "regression": counts["regression"] / n, "curves": a.get("curves", {}),
                    })
                seeds[seed] = steps
            out[key] = seeds
    return out


def plot_progress(data: dict[str, Any], k: int, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [key for key, seeds in data.items() if any(seeds.values())]
    if not rows:
        return paths
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], rows, strict=True):
        per_seed = [s for s in data[key].values() if s]
        steps = sorted({e["step"] for s in per_seed for e in s})
        for name, color in (("capability_gain", "tab:green"), ("self_distillation", "tab:blue"), ("regression", "tab:red")):
            means = []
            for step in steps:
                vals = [e[name] for s in per_seed for e in s if e["step"] == step]
                means.append(sum(vals) / len(vals))
            ax.plot(steps, means, marker="o", color=color, label=name.replace("_", " "))
        ax.set_title(f"{key} ({len(per_seed)} seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"fraction of held-out problems (k = {k})")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "progress.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], rows, strict=True):
        for seed, steps in data[key].items():
            if not steps:
                continue
            curves = steps[-1]["curves"]
            for subset, style in (("capability_gain", "-"), ("distillation", "--")):
                entry = curves.get(subset, {})
                for label, color in (("unguided", "tab:gray"), ("guided", "tab:orange")):
                    if label in entry:
                        curve = entry[label]["curve"]
                        ax.plot(range(1, len(curve) + 1), curve, style, color=color, alpha=0.7,
                                label=f"{subset.replace('_', ' ')}, {label}" if seed == min(data[key]) else None)
        ax.set_xscale("log", base=2)
        ax.set_title(f"initial policy, problems {key} gained", fontsize=9)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass@k of the initial policy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "pass_at_k.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def progress_markdown(data: dict[str, Any], k: int) -> str:
    lines = [f"### Progress over training (Eq. 1-2, k = {k}): fractions of held-out problems, mean over seeds", "",
             "| row | step | greedy pass@1 | self-distillation | capability gain | regression |", "|---|---|---|---|---|---|"]
    for key, seeds in data.items():
        per_seed = [s for s in seeds.values() if s]
        for step in sorted({e["step"] for s in per_seed for e in s}):
            vals = {n: [e[n] for s in per_seed for e in s if e["step"] == step] for n in ("pass1", "self_distillation", "capability_gain", "regression")}
            cells = " | ".join(f"{_fmt(mean_std(v)[0])} ± {_fmt(mean_std(v)[1], mean_std(v)[0])}" for v in vals.values())
            lines.append(f"| {key} | {step} | {cells} |")
    return "\n".join(lines)


def write_report(grid: Grid, state: dict[str, Any]) -> list[Path]:
    """Write ``report.md`` and ``report.json`` (and the figures) into the grid's output directory."""
    cache: dict[Path, Any] = {}
    data = {t.name: table_data(grid, t, cache) for t in grid.tables}
    last = state["invocations"][-1] if state.get("invocations") else {}
    run_seconds = []
    for run in grid.runs:
        done = grid.output_dir / "runs" / run.name / EXPERIMENT_DIR / DONE
        if done.exists():
            run_seconds.append(read_document(done)["wall_seconds"])
    lines = [f"# Experiment {grid.path.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += [
        f"Base config `{grid.base.name}`, seeds {', '.join(map(str, grid.seeds))}, {len(grid.runs)} runs "
        f"({len(run_seconds)} finished); grid settings: {', '.join(f'`{k}={v}`' for k, v in grid.common.items()) or 'none'}.",
        f"Held-out evaluation after training: greedy pass@1 and {grid.eval.samples} samples per problem "
        f"(pass@k for k in {list(grid.eval.k)}), without hints.",
    ]
    if last:
        lines.append(
            f"Last invocation: {last.get('wall_seconds', 0) / 60:.1f} min wall for {len(last.get('ran', [])) + len(last.get('failed', []))} run(s), "
            f"{last.get('jobs')} job(s) x {last.get('threads')} thread(s); {len(last.get('skipped', []))} run(s) already finished; "
            f"machine: {last.get('machine', {}).get('cpus')} CPUs, {last.get('machine', {}).get('processor')}, "
            f"torch {last.get('machine', {}).get('torch')}. Sum of run times: {sum(run_seconds) / 60:.1f} min."
        )
    lines += ["", "Cells: mean ± standard deviation over seeds (per-seed values in seed order; `-`: run not finished or metric absent).", ""]
    for table in grid.tables:
        lines += [markdown_table(table, data[table.name]), ""]
    paths = [grid.output_dir / "report.md", grid.output_dir / "report.json"]
    out_json: dict[str, Any] = {"grid": str(grid.path), "seeds": list(grid.seeds), "tables": data, "state": state}
    if grid.progress_rows:
        prog = progress_data(grid)
        out_json["progress"] = {k: {str(s): [{kk: vv for kk, vv in e.items() if kk != "curves"} for e in v] for s, v in seeds.items()} for k, seeds in prog.items()}
        lines += [progress_markdown(prog, grid.progress_k), ""]
        figs = plot_progress(prog, grid.progress_k, grid.output_dir)
        lines += [f"![{p.stem}]({p.name})" for p in figs]
        paths += figs
    (grid.output_dir / "report.md").write_text("\n".join(lines) + "\n")
    (grid.output_dir / "report.json").write_text(json.dumps(out_json, indent=1))
    return paths


def finished_runs(grid: Grid) -> list[Run]:
    return [r for r in grid.runs if (grid.output_dir / "runs" / r.name / EXPERIMENT_DIR / DONE).exists()]
