"""The grid file of ``nemo-guide experiment``: what to run and which tables to make.

A grid names a base config, overrides for every run, the seeds, and tables. Each table
has either named ``rows`` (one override set each) or ``axes`` (config key -> values;
the rows are their Cartesian product). Every (row, seed) is one normal ``nemo-guide
train`` run; rows of different tables with the same overrides are one run. A row with
``eval_only: true`` trains nothing and evaluates the base model (the warm start)::

    base: ../tiny_cpu.yaml            # relative to this file
    output_dir: runs/experiments/x    # relative to the working directory
    seeds: [0, 1, 2]
    set: {run.steps: 160}             # every run
    eval: {samples: 16, k: [1, 16]}   # after training: greedy pass@1, pass@k of n samples
    tables:
      table1:
        title: Guide vs GRPO
        rows:
          warm_start: {eval_only: true}
          grpo: {algorithm.mode: grpo}
          guide: {}
        columns: {"pass@1 novel": eval.pass1.novel}
      thresholds:
        axes: {algorithm.guidance_threshold: [all_incorrect, always]}
        columns: {"pass@1": eval.pass1.all}
    progress: {rows: [table1/guide, table1/grpo], k: 16}

Columns name a metric (:data:`METRIC_HELP`). :func:`load_grid` refuses a bad file before
anything runs, naming the field and its line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_guide.config import ConfigError

EVAL_KINDS = ("all", "known", "novel", "unseen", "rare")
TRAIN_AGGS = ("first", "last", "mean", "min", "max")
METRIC_HELP = (
    "eval.<pass1|pass1_mean|passK>.<all|known|novel|unseen|rare|op:SYMBOL> (final held-out evaluation without hints: "
    "greedy pass@1, mean over samples, pass@K with K in eval.k; by kind or by operator, e.g. op:#), train.<first|last|mean|min|max>.<metrics.jsonl key> "
    "(e.g. train.first.guided/ratio_p50), or summary.<summary.json key> (e.g. summary.wall_seconds)"
)
TOP_KEYS = ("description", "base", "output_dir", "seeds", "set", "eval", "tables", "progress")
TABLE_KEYS = ("title", "rows", "axes", "columns", "note")
EVAL_KEYS = ("samples", "k", "limit", "with_hints")
PROGRESS_KEYS = ("rows", "k")


class GridError(ConfigError):
    """A grid file that cannot run; ``problems`` each name the field (and its line)."""

    def __init__(self, problems: list[str], source: str) -> None:
        super().__init__(problems, source)
        self.args = (f"{source}: {len(problems)} problem(s) in the grid file, nothing was run:\n  " + "\n  ".join(problems),)

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class EvalSpec:
    samples: int = 16
    """Samples per held-out problem at the training temperature, besides the greedy answer."""
    k: tuple[int, ...] = (1,)
    limit: int | None = None
    with_hints: bool = False


@dataclass(frozen=True)
class Run:
    """One training run of the grid: a normal run directory ``<output_dir>/runs/<name>``."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    """Sorted ``(config key, value)`` pairs beyond the grid's ``set``."""
    seed: int
    eval_only: bool = False
    progress: bool = False
    """Evaluate every checkpoint and the initial policy too (Figures 1-2 analogues)."""

    def override_args(self, common: dict[str, Any]) -> list[str]:
        """``key=value`` arguments for ``nemo-guide train``: the grid's ``set``, this run's, the seed."""
        merged = {**common, **dict(self.overrides), "run.seed": self.seed}
        return [f"{key}={_yaml_value(value)}" for key, value in merged.items()]


@dataclass(frozen=True)
class Row:
    label: str
    overrides: tuple[tuple[str, Any], ...]
    eval_only: bool
    slug: str


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    columns: tuple[tuple[str, str], ...]
    """``(label, metric)`` pairs."""
    note: str = ""


@dataclass(frozen=True)
class Grid:
    path: Path
    base: Path
    output_dir: Path
    seeds: tuple[int, ...]
    common: dict[str, Any]
    eval: EvalSpec
    tables: tuple[Table, ...]
    progress_rows: tuple[str, ...] = ()
    """``table/row`` labels whose runs are evaluated at every checkpoint."""
    progress_k: int = 16
    description: str = ""
    runs: tuple[Run, ...] = field(default=())

    def run_for(self, row: Row, seed: int) -> Run:
        return next(r for r in self.runs if r.name == run_name(row.slug, seed))


def _yaml_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _slug(overrides: tuple[tuple[str, Any], ...], eval_only: bool) -> str:
    if eval_only:
        return "initial" + ("-" + _slug(overrides, False) if overrides else "")
    if not overrides:
        return "base"
    text = "_".join(f"{key.rsplit('.', 1)[-1]}-{_yaml_value(value)}" for key, value in overrides)
    text = re.sub(r"[^A-Za-z0-9._-]+", "", text.replace("=", "-"))
    digest = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:6]
    return f"{text[:60]}-{digest}"


def run_name(slug: str, seed: int) -> str:
    return f"{slug}-s{seed}"


def _check_metric(metric: Any, ks: tuple[int, ...]) -> str | None:
    if not isinstance(metric, str):
        return f"{metric!r} is not a metric name; use {METRIC_HELP}"
    parts = metric.split(".", 2)
    if parts[0] == "eval":
        ok_names = {"pass1", "pass1_mean", *(f"pass{k}" for k in ks)}
        if len(parts) == 3 and parts[1] in ok_names and (parts[2] in EVAL_KINDS or (parts[2].startswith("op:") and len(parts[2]) > 3)):
            return None
        return f"{metric!r}: use eval.<{'|'.join(sorted(ok_names))}>.<{'|'.join(EVAL_KINDS)}|op:SYMBOL> (pass@K needs K in eval.k)"
    if parts[0] == "train":
        if len(parts) == 3 and parts[1] in TRAIN_AGGS and parts[2]:
            return None
        return f"{metric!r}: use train.<{'|'.join(TRAIN_AGGS)}>.<metrics.jsonl key>"
    if parts[0] == "summary" and len(parts) >= 2:
        return None
    return f"{metric!r} is not a metric name; use {METRIC_HELP}"


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every problem is reported at once.

    Raises:
        GridError: unknown keys, empty axes, rows, columns or seeds, bad metric names,
            progress rows that are not in a table (config keys are checked by
            :func:`nemo_guide.experiment.runner.check_configs`).
        FileNotFoundError: the file does not exist.
    """
    from omegaconf import OmegaConf

    from nemo_guide.config.load import _yaml_lines

    path = Path(path)
    source = str(path)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    lines = _yaml_lines(path)
    problems: list[str] = []

    def where(dotted: str) -> str:
        parts = dotted.split(".")
        while parts and ".".join(parts) not in lines:
            parts.pop()
        return f"{source}:{lines['.'.join(parts)]}: " if parts else f"{source}: "

    if not isinstance(raw, dict):
        raise GridError([f"{source}: the grid file must be a mapping with keys {', '.join(TOP_KEYS)}"], source)
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{where(str(key))}unknown key {key!r}; the grid's keys are {', '.join(TOP_KEYS)}")
    base_text = raw.get("base")
    if not isinstance(base_text, str) or not base_text:
        problems.append(f"{where('base')}base = {base_text!r}: name the base config file (relative to the grid file), e.g. base: ../tiny_cpu.yaml")
        base = path
    else:
        base = (path.parent / base_text).resolve()
        if not base.is_file():
            problems.append(f"{where('base')}base = {base_text!r}: {base} does not exist (the path is relative to the grid file)")
    out_text = raw.get("output_dir", f"runs/experiments/{path.stem}")
    if not isinstance(out_text, str) or not out_text:
        problems.append(f"{where('output_dir')}output_dir = {out_text!r}: give a directory, e.g. runs/experiments/{path.stem}")
        out_text = f"runs/experiments/{path.stem}"
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        problems.append(f"{where('seeds')}seeds = {seeds!r}: give a non-empty list of seeds (whole numbers >= 0), e.g. seeds: [0, 1, 2]")
        seeds = [0]
    elif len(set(seeds)) != len(seeds):
        problems.append(f"{where('seeds')}seeds = {seeds!r}: a seed is listed twice; list each once")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        problems.append(f"{where('set')}set = {common!r}: give a mapping of config key to value, e.g. set: {{run.steps: 160}}")
        common = {}
    common = _flatten(common)
    for key in common:
        if key in ("run.seed", "run.name", "run.output_dir", "run.resume"):
            problems.append(f"{where('set')}set.{key}: the grid sets {key} itself (seeds: lists the seeds; output_dir: the directory); remove it")

    eval_raw = raw.get("eval") or {}
    eval_spec = EvalSpec()
    if not isinstance(eval_raw, dict):
        problems.append(f"{where('eval')}eval = {eval_raw!r}: give a mapping with keys {', '.join(EVAL_KEYS)}")
    else:
        for key in eval_raw:
            if key not in EVAL_KEYS:
                problems.append(f"{where('eval.' + str(key))}unknown key eval.{key}; eval's keys are {', '.join(EVAL_KEYS)}")
        samples = eval_raw.get("samples", 16)
        ks = eval_raw.get("k", [1])
        limit = eval_raw.get("limit")
        if not isinstance(samples, int) or samples < 0:
            problems.append(f"{where('eval.samples')}eval.samples = {samples!r}: give the samples per problem (a whole number >= 0)")
            samples = 0
        if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and 1 <= k <= max(samples, 1) for k in ks):
            problems.append(f"{where('eval.k')}eval.k = {ks!r}: give a non-empty list of k with 1 <= k <= eval.samples ({samples})")
            ks = [1]
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            problems.append(f"{where('eval.limit')}eval.limit = {limit!r}: give null (every held-out problem) or a number >= 1")
            limit = None
        eval_spec = EvalSpec(samples=samples, k=tuple(sorted(set(ks))), limit=limit, with_hints=bool(eval_raw.get("with_hints", False)))

    tables_raw = raw.get("tables")
    tables: list[Table] = []
    if not isinstance(tables_raw, dict) or not tables_raw:
        problems.append(f"{where('tables')}tables = {tables_raw!r}: give at least one table (name -> rows or axes, and columns)")
        tables_raw = {}
    for tname, traw in tables_raw.items():
        at = f"tables.{tname}"
        if not isinstance(traw, dict):
            problems.append(f"{where(at)}{at}: a table is a mapping with keys {', '.join(TABLE_KEYS)}")
            continue
        for key in traw:
            if key not in TABLE_KEYS:
                problems.append(f"{where(f'{at}.{key}')}unknown key {at}.{key}; a table's keys are {', '.join(TABLE_KEYS)}")
        rows = _table_rows(traw, at, where, problems)
        columns_raw = traw.get("columns")
        columns: list[tuple[str, str]] = []
        if not isinstance(columns_raw, dict) or not columns_raw:
            problems.append(f"{where(at + '.columns')}{at}.columns = {columns_raw!r}: give label: metric pairs, e.g. {{'pass@1 novel': eval.pass1.novel}}")
        else:
            for label, metric in columns_raw.items():
                bad = _check_metric(metric, eval_spec.k)
                if bad:
                    problems.append(f"{where(f'{at}.columns.{label}')}{at}.columns.{label}: {bad}")
                columns.append((str(label), str(metric)))
        tables.append(Table(str(tname), str(traw.get("title", tname)), tuple(rows), tuple(columns), str(traw.get("note", ""))))

    progress_raw = raw.get("progress") or {}
    progress_rows: tuple[str, ...] = ()
    progress_k = 16
    if not isinstance(progress_raw, dict):
        problems.append(f"{where('progress')}progress = {progress_raw!r}: give {{rows: [table/row, ...], k: K}}")
    elif progress_raw:
        for key in progress_raw:
            if key not in PROGRESS_KEYS:
                problems.append(f"{where('progress.' + str(key))}unknown key progress.{key}; its keys are {', '.join(PROGRESS_KEYS)}")
        labels = {f"{t.name}/{r.label}" for t in tables for r in t.rows}
        prow = progress_raw.get("rows")
        if not isinstance(prow, list) or not prow:
            problems.append(f"{where('progress.rows')}progress.rows = {prow!r}: list table/row labels, e.g. [table1/guide_grpo]")
            prow = []
        for item in prow:
            if item not in labels:
                problems.append(f"{where('progress.rows')}progress.rows: {item!r} is not a row of a table; the rows are {', '.join(sorted(labels))}")
        progress_rows = tuple(prow)
        progress_k = progress_raw.get("k", 16)
        if not isinstance(progress_k, int) or not 1 <= progress_k <= max(eval_spec.samples, 1):
            problems.append(f"{where('progress.k')}progress.k = {progress_k!r}: give 1 <= k <= eval.samples ({eval_spec.samples})")

    if not problems:
        tables = _normalized(tables, base, common, where, problems)
    if problems:
        raise GridError(problems, source)

    progress_slugs = {r.slug for t in tables for r in t.rows if f"{t.name}/{r.label}" in progress_rows}
    runs: dict[str, Run] = {}
    for table in tables:
        for row in table.rows:
            for seed in seeds:
                name = run_name(row.slug, seed)
                runs.setdefault(name, Run(name, row.overrides, seed, row.eval_only, row.slug in progress_slugs))
    return Grid(
        path=path.resolve(), base=base, output_dir=Path(out_text), seeds=tuple(seeds), common=common, eval=eval_spec,
        tables=tuple(tables), progress_rows=progress_rows, progress_k=progress_k,
        description=str(raw.get("description", "")), runs=tuple(runs.values()),
    )


def _normalized(tables: list[Table], base: Path, common: dict[str, Any], where, problems: list[str]) -> list[Table]:
    """Check every row's config (with the grid's ``set``) and drop overrides equal to the base
    config's value, so rows that resolve to the same config are one run."""
    from nemo_guide.config import ConfigError, load_config

    try:
        resolved = load_config(base, [f"{k}={_yaml_value(v)}" for k, v in common.items()]).to_dict()
    except ConfigError as exc:
        problems.extend(f"{where('set')}set: {p}" for p in exc.problems)
        return tables
    out = []
    for table in tables:
        rows = []
        for row in table.rows:
            args = [f"{k}={_yaml_value(v)}" for k, v in {**common, **dict(row.overrides)}.items()]
            try:
                load_config(base, args)
            except ConfigError as exc:
                at = f"tables.{table.name}"
                problems.extend(f"{where(at)}{at}, row {row.label!r}: {p}" for p in exc.problems)
                continue
            kept = tuple((k, v) for k, v in row.overrides if _lookup(resolved, k) != v)
            rows.append(Row(row.label, kept, row.eval_only, _slug(kept, row.eval_only)))
        out.append(Table(table.name, table.title, tuple(rows), table.columns, table.note))
    return out


def _lookup(resolved: dict[str, Any], dotted: str) -> Any:
    node: Any = resolved
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return object()
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{a: {b: 1}}`` and ``{a.b: 1}`` both to ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _table_rows(traw: dict[str, Any], at: str, where, problems: list[str]) -> list[Row]:
    has_rows, has_axes = "rows" in traw, "axes" in traw
    if has_rows == has_axes:
        problems.append(f"{where(at)}{at}: give exactly one of rows (named override sets) or axes (config key -> list of values)")
        return []
    rows: list[Row] = []
    if has_rows:
        rows_raw = traw["rows"]
        if not isinstance(rows_raw, dict) or not rows_raw:
            problems.append(f"{where(at + '.rows')}{at}.rows = {rows_raw!r}: give at least one row (label: {{config.key: value}}; {{}} is the base config)")
            return []
        for label, overrides in rows_raw.items():
            if overrides is None:
                overrides = {}
            if not isinstance(overrides, dict):
                problems.append(f"{where(f'{at}.rows.{label}')}{at}.rows.{label} = {overrides!r}: give a mapping of config key to value ({{}} for the base config)")
                continue
            flat = _flatten(overrides)
            eval_only = bool(flat.pop("eval_only", False))
            pairs = tuple(sorted(flat.items()))
            rows.append(Row(str(label), pairs, eval_only, _slug(pairs, eval_only)))
        return rows
    axes = traw["axes"]
    if not isinstance(axes, dict) or not axes:
        problems.append(f"{where(at + '.axes')}{at}.axes = {axes!r}: give config key -> non-empty list of values")
        return []
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            problems.append(f"{where(f'{at}.axes.{key}')}{at}.axes.{key} = {values!r}: an axis needs a non-empty list of values")
    if any(not isinstance(v, list) or not v for v in axes.values()):
        return []
    keys = list(axes)
    for combo in itertools.product(*(axes[k] for k in keys)):
        pairs = tuple(sorted(zip(keys, combo, strict=True)))
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_yaml_value(v)}" for k, v in zip(keys, combo, strict=True))
        rows.append(Row(label, pairs, False, _slug(pairs, False)))
    return rows
