"""One embedded training step's time, split, for GRPO and Guide over k x B; Guide's generation
against its ideal.

The main job's setting (``conf/tiny_cpu.yaml``: ``builtin:tiny`` on ``builtin:digit_ops``, the
embedded torch backend), one step of Algorithm 1 (``nemo_guide.loop.algorithm_step``) at each
``k`` (``algorithm.group_size``) and ``B`` (``data.prompt_batch_size``), in ``mode=grpo`` and
``mode=guide_grpo``. The guided fraction is controlled: the B prompts are half novel-operator
problems (# and &), which the warm-started policy never solves without their hint, so Guide
guides them, and half known-operator ones, which it solves; the measured fraction is printed.

Every step starts from the warm-start weights (restored before each timed step) with the same
sampling seeds, so GRPO's rollouts and Guide's plain rollouts are the same tokens, and Guide
adds one ``generate`` call on the guided prompts. Its ideal generation time is GRPO's times
``1 + guided fraction`` (as many guided rollouts as plain ones, per guided prompt); the table
shows the measured ratio, the ideal one and their quotient (the issue's target: <= 1.05 at
k*B >= 48), the same quotient from the ``generate`` calls' process CPU time (steadier than
wall-clock time on a shared machine), a "work ideal" that also counts the positions each
call runs (the hinted prompts are longer; see ``_work_ideal``), and the two calls' decode
steps (the longest response of each call bounds its number of forward passes).

Each (k, B, mode, checkout) runs in a fresh subprocess: one warm-up step, then ``--repeats``
timed steps (median). ``--before PATH`` adds the same runs with another checkout's
``nemo_guide`` first on ``sys.path`` (and its ``conf/tiny_cpu.yaml``), so before/after columns
come from one run. Variants are interleaved within each of ``--rounds`` rounds (order rotating);
tables show medians over rounds.

    python benchmarks/step.py                                    # k in {4, 8} x B in {6, 12}
    python benchmarks/step.py --before /path/to/main/checkout    # before/after side by side
    python benchmarks/step.py --k 4 --batch 6 --rounds 1 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _subprocess import add_benchmark_arguments, parse_or_run_child, run_child  # benchmarks/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("generation", "scoring", "logprobs", "update")
MODES = {"grpo": "grpo", "guide": "guide_grpo"}


# -- the child process: one (k, B, mode, checkout) -------------------------------------------


def _controlled_batch(records, batch: int, seed: int) -> list[int]:
    """``batch`` record indices, novel-operator and known-operator problems alternating (novel
    first), in the seeded order of the loop's prompt sampler."""
    from nemo_guide.data.digit_ops import NOVEL
    from nemo_guide.prompts import PromptSampler

    order = PromptSampler(len(records), seed).next(len(records))
    novel = iter([i for i in order if any(op in records[i].problem for op in NOVEL)])
    known = iter(
        [i for i in order if not any(op in records[i].problem for op in NOVEL)]
    )
    return [next(novel) if j % 2 == 0 else next(known) for j in range(batch)]


def run_one(
    mode: str, k: int, batch: int, repeats: int, threads: int, seed: int, config: str
) -> dict:
    import torch

    torch.set_num_threads(threads)
    import nemo_guide
    from nemo_guide.cli import make_backend
    from nemo_guide.config import load_config
    from nemo_guide.loop import algorithm_step, load_prompts, reward_name
    from nemo_guide.rewards import make_reward
    from nemo_guide.steps import policy_loss_fn

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"algorithm.mode={MODES[mode]}",
            f"algorithm.group_size={k}",
            f"data.prompt_batch_size={batch}",
            f"run.seed={seed}",
            f"run.output_dir={tmp}",
        ]
        cfg = load_config(config, overrides)
        backend = make_backend(cfg)
        prompts, _ = load_prompts(cfg, backend)
        idx = _controlled_batch(prompts.records, batch, seed)
        reward_fn = make_reward(reward_name(cfg), num_workers=cfg.data.reward_workers)
        loss_fn = policy_loss_fn(cfg.algorithm, batch)
        start = {
            name: t.detach().clone() for name, t in backend.model.state_dict().items()
        }
        calls: list[tuple[int, int, float, float]] = []  # per generate call
        for name in ("generate", "generate_with_logprobs"):
            setattr(backend, name, _timed(getattr(backend, name), calls))
        runs = []
        try:
            for _ in range(1 + repeats):  # the first is a warm-up
                backend.model.load_state_dict(start)
                calls.clear()
                t = time.perf_counter()
                metrics = algorithm_step(
                    cfg, backend, reward_fn, loss_fn, prompts, idx, 1
                )
                total = time.perf_counter() - t
                runs.append(
                    {
                        **{s: metrics[f"time/{s}"] for s in SECTIONS},
                        "step": total,
                        "guided_frac": metrics["train/guided_frac"],
                        "generation_cpu": sum(call[3] for call in calls),
                        "calls": list(calls),
                    }
                )
        finally:
            close = getattr(reward_fn, "close", None)
            if close:
                close()
    timed = runs[1:]
    out = {
        key: statistics.median(r[key] for r in timed)
        for key in (*SECTIONS, "step", "generation_cpu")
    }
    out["guided_frac"] = timed[-1]["guided_frac"]
    out["calls"] = timed[-1]["calls"]
    out["checkout"] = str(Path(nemo_guide.__file__).resolve().parents[1])
    return out


def _timed(method, calls: list):
    """``method`` (a backend's generate), appending ``(rows, longest response, wall s, CPU s,
    widest prompt)`` per call to ``calls``."""

    def wrapper(prompts, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = method(prompts, **kwargs)
        calls.append(
            (
                len(prompts),
                max((len(r) for r in result[0]), default=0),
                time.perf_counter() - wall,
                time.process_time() - cpu,
                max((len(p) for p in prompts), default=0),
            )
        )
        return result

    return wrapper


# -- the parent -----------------------------------------------------------------------------


def _child(spec: dict, checkout: str, threads: int) -> dict | None:
    return run_child(__file__, spec, checkout, threads, cwd=checkout, tail=3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[4, 8],
        help="rollouts per prompt (algorithm.group_size)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[6, 12],
        help="prompts per step (data.prompt_batch_size)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="run.seed: the prompt order and sampling seeds",
    )
    add_benchmark_arguments(parser, repeats_help="timed steps per subprocess (median), after one warm-up step", before_help="another checkout (e.g. main) measured side by side")
    args = parse_or_run_child(parser, run_one)
    if args is None:
        return
    checkouts = {"after": str(REPO)}
    if args.before:
        checkouts["before"] = str(Path(args.before).resolve())
    configs = [(k, b) for k in args.k for b in args.batch]
    variants = [(mode, which) for which in checkouts for mode in MODES]
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for k, b in configs:
            shift = r % len(variants)
            for mode, which in variants[shift:] + variants[:shift]:
                config = Path(checkouts[which]) / "conf" / "tiny_cpu.yaml"
                spec = dict(
                    mode=mode,
                    k=k,
                    batch=b,
                    repeats=args.repeats,
                    threads=args.threads,
                    seed=args.seed,
                    config=str(config),
                )
                out = _child(spec, checkouts[which], args.threads)
                if out is not None:
                    results.setdefault((k, b, mode, which), []).append(out)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    _print(configs, checkouts, results, args)


def _median(results, key, field):
    runs = results.get(key)
    return statistics.median(run[field] for run in runs) if runs else None


def _table(cols, rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def _work_ideal(calls) -> float | None:
    """Guide/GRPO generation time if it were proportional to the positions each call runs
    (rows x (widest prompt + decode steps)): 1 + guided call's / plain call's. Unlike
    ``1 + guided fraction`` it counts the hinted prompts' extra length and the two calls'
    different decode steps; what remains above it is the per-call and per-token fixed cost."""
    if not calls:
        return None
    plain = calls[0][0] * (calls[0][4] + calls[0][1])
    return 1 + sum(c[0] * (c[4] + c[1]) for c in calls[1:]) / plain


def _print(configs, checkouts, results, args) -> None:
    import torch

    print(
        f"\nembedded step on conf/tiny_cpu.yaml (builtin:tiny, digit_ops, half novel-operator prompts), median of "
        f"{args.rounds} interleaved rounds x median of {args.repeats} steps; {args.threads} thread(s), torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end"
    )
    for which, path in checkouts.items():
        print(f"{which}: nemo_guide from {path}")
    print("\nseconds per step, by section")
    rows = []
    for k, b in configs:
        for which in checkouts:
            for mode in MODES:
                key = (k, b, mode, which)
                rows.append(
                    [
                        str(k),
                        str(b),
                        str(k * b),
                        mode,
                        which,
                        *(_fmt(_median(results, key, f)) for f in (*SECTIONS, "step")),
                    ]
                )
    _table(["k", "B", "k*B", "mode", "checkout", *SECTIONS, "step"], rows)

    print(
        "\nGuide/GRPO generation time: measured vs ideal (1 + guided fraction); target measured/ideal <= 1.05 at k*B >= 48"
    )
    rows = []
    for k, b in configs:
        for which in checkouts:
            grpo, guide = (
                _median(results, (k, b, "grpo", which), "generation"),
                _median(results, (k, b, "guide", which), "generation"),
            )
            grpo_cpu, guide_cpu = (
                _median(results, (k, b, "grpo", which), "generation_cpu"),
                _median(results, (k, b, "guide", which), "generation_cpu"),
            )
            measured_cpu = (
                None if grpo_cpu is None or guide_cpu is None else guide_cpu / grpo_cpu
            )
            runs = results.get((k, b, "guide", which))
            frac = (
                statistics.median(run["guided_frac"] for run in runs) if runs else None
            )
            measured = None if grpo is None or guide is None else guide / grpo
            ideal = None if frac is None else 1 + frac
            steps = (
                "/".join(str(call[1]) for call in runs[-1]["calls"]) if runs else "-"
            )
            work = _work_ideal(runs[-1]["calls"]) if runs else None
            rows.append(
                [
                    str(k),
                    str(b),
                    str(k * b),
                    which,
                    _fmt(frac, "{:.2f}"),
                    _fmt(ideal, "{:.2f}"),
                    _fmt(measured, "{:.3f}"),
                    _fmt(None if measured is None else measured / ideal, "{:.3f}"),
                    _fmt(
                        None if measured_cpu is None else measured_cpu / ideal, "{:.3f}"
                    ),
                    _fmt(work, "{:.2f}"),
                    _fmt(
                        None if measured is None or not work else measured / work,
                        "{:.3f}",
                    ),
                    steps,
                ]
            )
    _table(
        [
            "k",
            "B",
            "k*B",
            "checkout",
            "guided frac",
            "ideal",
            "measured",
            "measured/ideal",
            "CPU-time measured/ideal",
            "work ideal",
            "measured/work ideal",
            "decode steps plain/guided",
        ],
        rows,
    )
    if "before" in checkouts:
        print("\nafter/before time (below 1: faster)")
        rows = []
        for k, b in configs:
            for mode in MODES:
                ratios = []
                for f in (*SECTIONS, "step"):
                    a, z = (
                        _median(results, (k, b, mode, "after"), f),
                        _median(results, (k, b, mode, "before"), f),
                    )
                    ratios.append(_fmt(None if a is None or not z else a / z, "{:.2f}"))
                rows.append([str(k), str(b), str(k * b), mode, *ratios])
        _table(["k", "B", "k*B", "mode", *SECTIONS, "step"], rows)


if __name__ == "__main__":
    main()
