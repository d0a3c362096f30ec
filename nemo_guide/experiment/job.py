"""One run of a grid, in its own process: train (or resume), evaluate, write ``experiment/done.json``.

``python -m nemo_guide.experiment.job JOB.json``. Everything goes through the normal
commands (``nemo-guide train`` and ``nemo-guide eval``, called in-process), so the run
directory is an ordinary one: it can be inspected, resumed and evaluated on its own.
A killed job leaves a run that the next ``--resume`` continues (training from its newest
checkpoint, evaluations from their samples files); ``done.json`` is written last, by
rename, and marks the run finished.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from nemo_guide.core.metrics import pass_at_k

DONE = "done.json"
EXPERIMENT_DIR = "experiment"
GRID_STATE = "grid.json"


def read_document(path: Path) -> Any:
    """One JSON document the grid wrote (a job file, ``done.json``, ``grid.json``); ``None`` when missing.

    Raises:
        RunError: the file is not valid JSON (named, with the fix).
    """
    from nemo_guide.errors import RunError

    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not a JSON document ({exc}); fix: delete it (a run's done.json is remade by --resume)") from exc


def eval_metrics(samples: Path, kinds: dict[str, tuple[str, ...]], ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Per group (``all``, each record kind, each operator ``op:<symbol>``): greedy pass@1 (``pass1``),
    mean pass@1 of the samples (``pass1_mean``), unbiased pass@k (``passK``), over unguided rows.

    Args:
        kinds: record id -> the groups it belongs to besides ``all`` (e.g. ``("novel", "op:#")``).
    """
    from nemo_guide.eval_report import problem_stats
    from nemo_guide.evaluation import read_samples

    stats = [p for p in problem_stats(read_samples(samples)).values() if not p.guided]
    groups: dict[str, list] = {"all": stats}
    for p in stats:
        for group in kinds.get(p.id, ()):
            groups.setdefault(group, []).append(p)
    out: dict[str, dict[str, float]] = {}
    for kind, problems in groups.items():
        entry: dict[str, float] = {"problems": float(len(problems))}
        greedy = [float(bool(p.greedy)) for p in problems if p.greedy is not None]
        if greedy:
            entry["pass1"] = sum(greedy) / len(greedy)
        sampled = [p for p in problems if p.n > 0]
        if sampled:
            entry["pass1_mean"] = sum(p.c / p.n for p in sampled) / len(sampled)
            for k in ks:  # pass1 is the greedy answer's; pass@1 of samples is pass1_mean
                if 1 < k <= min(p.n for p in sampled):
                    entry[f"pass{k}"] = sum(pass_at_k(p.n, p.c, k) for p in sampled) / len(sampled)
        out[kind] = entry
    return out


def record_kinds(config: str, args: list[str], limit: int | None) -> dict[str, tuple[str, ...]]:
    """Held-out record id -> its groups: the ``kind`` and ``op:<symbol>`` of built-in task records."""
    from nemo_guide.config import load_config
    from nemo_guide.evaluation import load_benchmarks

    cfg = load_config(config, args)
    out = {}
    for bench in load_benchmarks([], cfg.data.train, cfg.data.eval, limit if limit is not None else cfg.data.eval_limit):
        for rec in bench.records:
            extra = rec.extra or {}
            groups = [extra["kind"]] if isinstance(extra.get("kind"), str) else []
            groups += [f"op:{extra['op']}"] if isinstance(extra.get("op"), str) else []
            out[str(rec.id)] = tuple(groups)
    return out


def _cli(argv: list[str]) -> None:
    from nemo_guide.cli import main as cli
    from nemo_guide.errors import RunError

    print("$ nemo-guide " + " ".join(argv), flush=True)
    rc = cli(argv)
    if rc != 0:
        raise RunError(f"nemo-guide {argv[0]} exited with {rc}; see the lines above")


def _evaluate(job: dict[str, Any], out: Path, checkpoint: Path | None, n: int, ks: list[int], with_hints: bool) -> Path:
    argv = ["eval", job["base"], *job["args"]]
    if checkpoint is not None:
        argv.append(f"checkpoint={checkpoint}")
    argv += ["--n", str(n), "--k", *map(str, ks), "--out", str(out), "--no-progress", "--threads", str(job["threads"])]
    if job["eval"]["limit"] is not None:
        argv += ["--limit", str(job["eval"]["limit"])]
    if with_hints:
        argv.append("--with-hints")
    if (out / "results.json").exists() and (out / "samples.jsonl").exists():
        return out / "samples.jsonl"  # finished before a kill
    _cli(argv)
    return out / "samples.jsonl"


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (unless ``eval_only``), evaluate, and for progress runs evaluate every checkpoint and analyze."""
    from nemo_guide.analysis import analyze
    from nemo_guide.checkpoint import list_checkpoints

    start = time.time()
    run_dir = Path(job["run_dir"])
    exp = run_dir / EXPERIMENT_DIR
    ev = job["eval"]
    ks = sorted(set(ev["k"]))
    if not job["eval_only"]:
        resume = "true" if run_dir.exists() and list_checkpoints(run_dir) else "false"
        _cli(["train", job["base"], *job["args"], f"run.resume={resume}", "--no-progress", "--threads", str(job["threads"])])
        checkpoints = list_checkpoints(run_dir)
        final_ckpt: Path | None = checkpoints[-1][1]
    else:
        checkpoints, final_ckpt = [], None
    exp.mkdir(parents=True, exist_ok=True)
    progress_k = job["progress_k"]
    initial_n = max(ev["samples"], progress_k) if job["progress"] else ev["samples"]
    final = _evaluate(job, exp / "final", final_ckpt, initial_n if job["eval_only"] else ev["samples"], ks, ev["with_hints"] or (job["eval_only"] and job["progress"]))
    kinds = record_kinds(job["base"], job["args"], ev["limit"])
    result: dict[str, Any] = {"name": job["name"], "args": job["args"], "eval": eval_metrics(final, kinds, tuple(ks))}
    if job["progress"] and not job["eval_only"]:
        initial = _evaluate(job, exp / "initial", None, initial_n, [progress_k], True)
        steps = []
        for step, ckpt in checkpoints:
            samples = final if ckpt == final_ckpt else _evaluate(job, exp / f"step_{step}", ckpt, progress_k, [progress_k], False)
            analysis = analyze(initial, samples, k=progress_k, rounds=200)
            steps.append({"step": step, "analysis": analysis, "eval": eval_metrics(samples, kinds, (progress_k,))})
        result["progress"] = steps
    result["wall_seconds"] = time.time() - start
    tmp = exp / f"{DONE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(exp / DONE)
    return result


def main(argv: list[str]) -> int:
    from nemo_guide.cli import user_errors

    try:
        run_job(read_document(Path(argv[0])))
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
