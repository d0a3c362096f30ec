"""Self-distillation vs capability gain (paper Eq. 1-2, Appendix C, Figures 1-2) from sample files.

:func:`analyze` reads the ``samples.jsonl`` of an initial and a trained policy (written by
``nemo-guide eval``) and reports, over the problems present in both:

- Eq. 1-2 counts with the effective k (the training group size): a problem is solved at
  pass@1 when its greedy answer is right, and at pass@k by the initial policy when one of
  its first k samples is right; also the expectation over which k of the n samples are
  drawn (``decompose_progress_expected``);
- the same with ``k_abs`` (Appendix C), found on the initial policy's pass@k curve;
- pass@k curves, k = 1..n, of the initial policy without and with hints on the
  capability-gain and distillation subsets (Figure 2), with bootstrap 95% bands over
  problems.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from nemo_guide.core.metrics import absolute_k, decompose_progress, decompose_progress_expected, pass_at_k, pass_at_k_curve
from nemo_guide.data.errors import DataError
from nemo_guide.errors import RunError
from nemo_guide.eval_report import ProblemStats, problem_stats
from nemo_guide.samples import read_sample_file


def _split(path: Path) -> tuple[dict[tuple[str, str], ProblemStats], dict[tuple[str, str], ProblemStats]]:
    """``(unguided, guided)`` problems of a samples file, keyed by ``(benchmark, id)``."""
    stats = problem_stats(read_sample_file(path))
    return {(k[0], k[1]): v for k, v in stats.items() if not k[2]}, {(k[0], k[1]): v for k, v in stats.items() if k[2]}


def bootstrap_curve(ns: Sequence[int], cs: Sequence[int], max_k: int, *, rounds: int = 1000, seed: int = 0) -> tuple[list[float], list[float]]:
    """2.5 and 97.5 percentiles of the mean pass@k curve over problems resampled with replacement."""
    rng = random.Random(seed)
    per_problem = [[pass_at_k(n, c, k) for k in range(1, max_k + 1)] for n, c in zip(ns, cs, strict=True)]
    curves = []
    for _ in range(rounds):
        pick = [per_problem[rng.randrange(len(per_problem))] for _ in per_problem]
        curves.append([sum(p[k] for p in pick) / len(pick) for k in range(max_k)])
    lo, hi = [], []
    for k in range(max_k):
        values = sorted(c[k] for c in curves)
        lo.append(values[int(0.025 * (rounds - 1))])
        hi.append(values[int(0.975 * (rounds - 1))])
    return lo, hi


def analyze(before: Path, after: Path, *, k: int = 8, epsilon: float = 0.01, rounds: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The decomposition and the curves' data (see module docstring).

    Raises:
        FileNotFoundError: a file does not exist.
        DataError: a file is not a samples file, the two share no problem, or answers are missing.
        RunError: ``k`` is larger than the initial policy's samples per problem.
    """
    (init, guided), (final, _) = _split(before), _split(after)
    shared = sorted(set(init) & set(final))
    if not shared:
        raise DataError(f"{before} and {after} have no (benchmark, id) in common; evaluate both policies on the same problems")
    missing_greedy = [key for key in shared if init[key].greedy is None or final[key].greedy is None]
    if missing_greedy:
        raise DataError(f"{len(missing_greedy)} problem(s) lack a greedy answer (sample -1), e.g. {missing_greedy[0]}; rerun `nemo-guide eval`")
    n_min = min(init[key].n for key in shared)
    if n_min < k:
        raise RunError(f"k = {k} but the initial policy has only {n_min} samples for some problem; evaluate it with --n >= {k} or pass a smaller --k")
    init_pass1 = [bool(init[key].greedy) for key in shared]
    final_pass1 = [bool(final[key].greedy) for key in shared]
    ns = [init[key].n for key in shared]
    cs = [init[key].c for key in shared]

    def at(kk: int) -> dict[str, Any]:
        passk = [any(init[key].first[:kk]) for key in shared]
        return {
            "k": kk,
            "counts": decompose_progress(init_pass1, passk, final_pass1),
            "expected": decompose_progress_expected(init_pass1, ns, cs, kk, final_pass1),
        }

    curve = pass_at_k_curve(ns, cs, n_min)
    k_abs, converged = absolute_k(curve, epsilon)
    result: dict[str, Any] = {
        "before": str(before),
        "after": str(after),
        "problems": len(shared),
        "only_before": len(set(init) - set(final)),
        "only_after": len(set(final) - set(init)),
        "pass1_before": sum(init_pass1) / len(shared),
        "pass1_after": sum(final_pass1) / len(shared),
        "effective": at(k),
        "absolute": {**at(k_abs), "converged": converged, "epsilon": epsilon},
        "pass_at_k_before": curve,
    }
    # Figure 2: on the problems that progressed, guided vs unguided pass@k of the initial policy.
    passk = [any(init[key].first[:k]) for key in shared]
    progressed = [key for key, a, f in zip(shared, init_pass1, final_pass1, strict=True) if not a and f]
    subsets = {
        "capability_gain": [key for key in progressed if not passk[shared.index(key)]],
        "distillation": [key for key in progressed if passk[shared.index(key)]],
    }
    curves: dict[str, Any] = {}
    for name, keys in subsets.items():
        entry: dict[str, Any] = {"problems": len(keys)}
        for label, source in (("unguided", init), ("guided", guided)):
            have = [key for key in keys if key in source and source[key].n > 0]
            if not have:
                continue
            top = min(source[key].n for key in have)
            sn, sc = [source[key].n for key in have], [source[key].c for key in have]
            lo, hi = bootstrap_curve(sn, sc, top, rounds=rounds, seed=seed)
            entry[label] = {"problems": len(have), "curve": pass_at_k_curve(sn, sc, top), "lo": lo, "hi": hi}
        curves[name] = entry
    result["curves"] = curves
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for label in ("effective", "absolute"):
        r = result[label]
        c, e = r["counts"], r["expected"]
        rows.append(
            f"| {label} (k = {r['k']}) | {c['progress']} | {c['distillation']} ({e['distillation']:.1f}) | "
            f"{c['capability_gain']} ({e['capability_gain']:.1f}) | {c['regression']} | {c['net']} |"
        )
    conv = "" if result["absolute"]["converged"] else " (no plateau within n samples: k_abs is a lower bound)"
    return "\n".join(
        [
            f"Problems in both files: {result['problems']} (only before: {result['only_before']}, only after: {result['only_after']}).",
            f"Greedy pass@1: {result['pass1_before']:.3f} before, {result['pass1_after']:.3f} after.",
            "",
            "| k | progress | self-distillation | capability gain | regression | net |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Counts use the first k samples of the initial policy; in parentheses the expectation over which k of its n samples are drawn."
            + conv,
            "",
        ]
    )


def plot_curves(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["curves"]  # one panel per subset (capability gain, self-distillation)
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], curves.items(), strict=True):
        for label, color in (("unguided", "tab:blue"), ("guided", "tab:orange")):
            if label not in entry:
                continue
            d = entry[label]
            ks = list(range(1, len(d["curve"]) + 1))
            ax.plot(ks, d["curve"], "o-", color=color, label=f"initial policy, {'with' if label == 'guided' else 'without'} hint")
            ax.fill_between(ks, d["lo"], d["hi"], color=color, alpha=0.2)
        ax.set_title(f"{name.replace('_', ' ')} ({entry['problems']} problems)")
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
        else:  # an empty subset: say so instead of an empty legend
            ax.text(0.5, 0.5, "no samples in this subset", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "analysis.json", out_dir / "analysis.md", out_dir / "pass_at_k.png"]
    paths[0].write_text(json.dumps(result, indent=2), encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    plot_curves(result, paths[2])
    return paths
