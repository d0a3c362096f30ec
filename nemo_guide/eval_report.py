"""Summaries of ``nemo-guide eval``'s samples: pass@1 and pass@k with 95% intervals, and the report.

:func:`summarize` turns sample rows (:mod:`nemo_guide.samples`) into per-benchmark pass@1
(greedy, and the mean over samples) and unbiased pass@k, each with a 95% confidence
interval over problems, plus macro (mean of benchmarks) and micro (all problems pooled)
averages; :func:`markdown_table` lays them out like the paper's Table 1, and
:func:`write_results` writes ``results.json`` (which names exactly what was evaluated) and
``results.md``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from nemo_guide.core.metrics import pass_at_k

Z95 = 1.959964


@dataclass(frozen=True)
class ProblemStats:
    """One problem's samples: greedy correctness, ``n`` samples of which ``c`` correct."""

    benchmark: str
    id: str
    guided: bool
    greedy: bool | None
    n: int
    c: int
    first: tuple[bool, ...]
    """Sample correctness in sample order."""
    unscorable: bool = False
    """The policy could not take the prompt (see the samples' ``error``); scored incorrect."""


def problem_stats(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, bool], ProblemStats]:
    grouped: dict[tuple[str, str, bool], dict[int, bool]] = {}
    failed: set[tuple[str, str, bool]] = set()
    for row in rows:
        key = (row["benchmark"], str(row["id"]), bool(row["guided"]))
        grouped.setdefault(key, {})[int(row["sample"])] = bool(row["correct"])
        if row.get("error"):
            failed.add(key)
    out = {}
    for key, samples in grouped.items():
        ordered = tuple(samples[i] for i in sorted(s for s in samples if s >= 0))
        out[key] = ProblemStats(key[0], key[1], key[2], samples.get(-1), len(ordered), sum(ordered), ordered, key in failed)
    return out


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width of the normal 95% interval over the values)``; 0 width for one value."""
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, Z95 * math.sqrt(var / len(values))


def _metrics(problems: Sequence[ProblemStats], ks: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"problems": len(problems), "unscorable": sum(p.unscorable for p in problems)}
    greedy = [float(p.greedy) for p in problems if p.greedy is not None]
    if greedy:
        out["pass1_greedy"], out["pass1_greedy_ci95"] = mean_ci(greedy)
    sampled = [p for p in problems if p.n > 0]
    if sampled:
        out["pass1_mean"], out["pass1_mean_ci95"] = mean_ci([p.c / p.n for p in sampled])
        for k in ks:
            if k <= min(p.n for p in sampled):
                out[f"pass{k}"], out[f"pass{k}_ci95"] = mean_ci([pass_at_k(p.n, p.c, k) for p in sampled])
    return out


def summarize(rows: Iterable[dict[str, Any]], ks: Sequence[int] = (1,), *, guided: bool = False) -> dict[str, Any]:
    """Per-benchmark, macro and micro metrics of the unguided (or guided) samples."""
    stats = [p for p in problem_stats(rows).values() if p.guided == guided]
    names = sorted({p.benchmark for p in stats})
    per = {name: _metrics([p for p in stats if p.benchmark == name], ks) for name in names}
    macro: dict[str, Any] = {}
    for key in sorted({k for m in per.values() for k in m if not k.endswith("_ci95") and k not in ("problems", "unscorable")}):
        values = [m[key] for m in per.values() if key in m]
        if len(values) == len(per):
            macro[key] = sum(values) / len(values)
    return {"benchmarks": per, "macro": macro, "micro": _metrics(stats, ks), "guided": guided}


def markdown_table(summary: dict[str, Any], title: str = "model") -> str:
    """Rows: metrics; columns: benchmarks, macro and micro average (percent, +- 95% CI)."""
    per = summary["benchmarks"]
    names = list(per)
    metrics = [k for k in ("pass1_greedy", "pass1_mean") if any(k in m for m in per.values())]
    # pass@1 (unbiased) equals the mean over samples, which has its own row.
    metrics += sorted({k for m in per.values() for k in m if k.startswith("pass") and k[4:].isdigit() and k != "pass1"}, key=lambda k: int(k[4:]))
    label = {"pass1_greedy": "pass@1 (greedy)", "pass1_mean": "pass@1 (mean of samples)"}
    head = f"| {title} | " + " | ".join(names) + " | macro avg | micro avg |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for metric in metrics:
        cells = []
        for m in [per[n] for n in names] + [summary["micro"]]:
            cells.append(f"{100 * m[metric]:.1f} ± {100 * m[metric + '_ci95']:.1f}" if metric in m else "-")
        macro = summary["macro"].get(metric)
        cells.insert(len(names), f"{100 * macro:.1f}" if macro is not None else "-")
        lines.append(f"| {label.get(metric, 'pass@' + metric[4:])} | " + " | ".join(cells) + " |")
    lines.append("")
    counts = ", ".join(f"{n} {per[n]['problems']}" + (f" ({per[n]['unscorable']} the policy could not take, scored 0)" if per[n]["unscorable"] else "") for n in names)
    lines.append(f"Problems: {counts}. ± is the 95% interval over problems.")
    return "\n".join(lines) + "\n"


def report(rows: Iterable[dict[str, Any]], ks: Sequence[int], *, with_hints: bool, header: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``(results, markdown)``: ``header`` (what was evaluated) followed by the summaries of
    the rows without hints (and with hints when ``with_hints``)."""
    rows = list(rows)
    result = {**header, "unguided": summarize(rows, ks)}
    table = markdown_table(result["unguided"], title="without hints")
    if with_hints:
        result["guided"] = summarize(rows, ks, guided=True)
        table += "\n" + markdown_table(result["guided"], title="with hints")
    return result, table


def write_results(out_dir: Path, result: dict[str, Any], table: str) -> list[Path]:
    """``results.json`` and ``results.md`` in ``out_dir``, each written whole or not at all."""
    paths = [Path(out_dir) / "results.json", Path(out_dir) / "results.md"]
    for path, text in zip(paths, (json.dumps(result, indent=2), table), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths
