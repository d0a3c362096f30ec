"""The cases of Theorem 1's check, their table and figure, and ``python -m nemo_guide.theory``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_guide.core.guidance import GuidanceThreshold, GuidedGroupMode
from nemo_guide.theory.exact import (
    ASSUMPTION_TOL,
    DTYPE,
    Bandit,
    UpdateRule,
    assumption_value,
    expected_update,
    grpo,
    improvement,
    return_gradient,
    tabular,
    unsolved,
)


@dataclass(frozen=True)
class Case:
    """One bandit, the Guide rule checked on it, and what the case shows."""

    name: str
    bandit: Bandit
    guide: UpdateRule
    shows: str
    etas: tuple[float, ...] = field(default=(0.01, 0.1, 0.3, 1.0, 3.0))

    @property
    def baseline(self) -> UpdateRule:
        """Vanilla GRPO with the same k and advantage normalisation."""
        return grpo(self.guide.k, normalize_std=self.guide.normalize_std, eps=self.guide.eps)


def _hard_prompts(hint: float) -> Bandit:
    """Three prompts, four responses, response 0 correct; plain success rates about 0.03, 0.10, 0.30."""
    logits = torch.tensor([[-2.2, 0.5, 0.0, -0.5], [-1.1, 0.5, 0.0, -0.5], [0.2, 0.5, 0.0, -0.5]])
    rewards = torch.tensor([[1.0, 0, 0, 0]] * 3)
    bias = torch.zeros(3, 4)
    bias[:, 0] = hint
    return tabular(logits, bias, rewards)


def _interference() -> Bandit:
    """Two unsolved prompts, two responses (correct first), one parameter shared by both: the correct
    answer's logit is ``theta - 3`` for prompt 0 and ``-0.3 theta - 0.5`` for prompt 1, so theta helps
    prompt 0 and hurts prompt 1. Prompt 0 is hard (p ~ 0.05, guided in ~82% of steps), prompt 1 less so
    (p ~ 0.38, guided in ~15%) and more sensitive to theta (|d p_1 / d theta| ~ 0.070 > 0.045)."""
    features = torch.tensor([[[1.0], [0.0]], [[-0.3], [0.0]]])  # [Q=2, R=2, D=1]
    offset = torch.tensor([[-3.0, 0.0], [-0.5, 0.0]])
    bias = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    return Bandit(features, offset, bias, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.zeros(1))


def cases(k: int = 4) -> list[Case]:
    """The cases of ``python -m nemo_guide.theory`` (and docs/theorem1.png)."""
    paper = UpdateRule(k=k)
    return [
        Case("helpful hint", _hard_prompts(3.0), paper, "hint raises p~: assumption holds, Guide > GRPO"),
        Case("misleading hint", _hard_prompts(-2.0), paper, "hint lowers p~ six- to seven-fold: assumption still holds (union group), Guide > GRPO by almost as much"),
        Case("hint never correct", _hard_prompts(float("-inf")), paper, "p~ = 0, A~ = 0: assumption fails, Guide = GRPO exactly (no strict gain)"),
        Case("replace group", _hard_prompts(3.0), UpdateRule(k=k, group=GuidedGroupMode.REPLACE), "authors' group layout: A~ = 0 by construction, assumption fails, yet Guide > GRPO"),
        Case("shared parameter", _interference(), paper, "one parameter helps one unsolved prompt and hurts the other: assumption holds, Guide's first-order change is negative, GRPO's positive"),
        Case(
            "always, misleading hint",
            _hard_prompts(-2.0),
            UpdateRule(k=k, threshold=GuidanceThreshold.ALWAYS),
            "threshold 'always' (Table 3), hint lowers p~: A~ < 0, assumption fails, yet Guide > GRPO",
        ),
        Case(
            "always, replace, mild hint",
            _hard_prompts(1.0),
            UpdateRule(k=k, threshold=GuidanceThreshold.ALWAYS, group=GuidedGroupMode.REPLACE),
            "A~ = 0, assumption fails, and Guide < GRPO",
        ),
    ]


def evaluate(case: Case) -> list[dict]:
    """One row per step size: improvements and first-order terms of GRPO and Guide, and the assumption."""
    g_grpo, g_guide = expected_update(case.bandit, case.baseline), expected_update(case.bandit, case.guide)
    grad = return_gradient(case.bandit)
    slope_grpo, slope_guide = float(grad @ g_grpo), float(grad @ g_guide)
    assumption = float(assumption_value(case.bandit, case.guide))
    rows = []
    for eta in case.etas:
        rows.append(
            {
                "case": case.name,
                "rule": case.guide.describe(),
                "unsolved": f"{int(unsolved(case.bandit).sum())}/{case.bandit.num_prompts}",
                "eta": eta,
                "dJ_grpo": float(improvement(case.bandit, g_grpo, eta)),
                "dJ_guide": float(improvement(case.bandit, g_guide, eta)),
                "first_grpo": eta * slope_grpo,
                "first_guide": eta * slope_guide,
                "assumption": assumption,
                "holds": assumption > ASSUMPTION_TOL,
            }
        )
    return rows


def _signed(value: float) -> str:
    """``+0.591``, ``-0.135``, or ``0`` within :data:`ASSUMPTION_TOL` (rounding of an exact 0)."""
    return "0" if abs(value) <= ASSUMPTION_TOL else f"{value:+.3f}"


def compare(guide: float, grpo: float, rel: float = 1e-9) -> str:
    """``"yes"`` if ``guide > grpo``, ``"equal"`` within ``rel`` of their scale, else ``"no"``."""
    scale = max(abs(guide), abs(grpo), 1e-300)
    if abs(guide - grpo) <= rel * scale:
        return "equal"
    return "yes" if guide > grpo else "no"


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`evaluate` rows."""
    head = "| case | Guide rule | U | eta | dJ GRPO | dJ Guide | eta<gradJ,g> GRPO | eta<gradJ,g> Guide | E[A~] | assumption | Guide > GRPO (1st order) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        verdict = compare(row["first_guide"], row["first_grpo"])
        lines.append(
            f"| {row['case']} | {row['rule']} | {row['unsolved']} | {row['eta']:g} | {row['dJ_grpo']:.3e} | {row['dJ_guide']:.3e} | {row['first_grpo']:.3e} | "
            f"{row['first_guide']:.3e} | {_signed(row['assumption'])} | {'holds' if row['holds'] else 'fails'} | {verdict} |"
        )
    return "\n".join(lines)


def plot(case_rows: dict[str, dict], out: Path, etas: torch.Tensor) -> Path:
    """Improvement per unit step, (J(theta + eta E[g]) - J(theta)) / eta, vs eta for GRPO and Guide, one
    panel per case; the first-order terms <grad J, E[g]> are the dashed levels the curves reach as eta -> 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(case_rows)
    cols, rows = 3, (len(names) + 2) // 3
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.7 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        case = case_rows[name]
        for label, color, curve, slope in (
            ("GRPO", "tab:blue", case["dJ_grpo"], case["slope_grpo"]),
            ("Guide", "tab:orange", case["dJ_guide"], case["slope_guide"]),
        ):
            ax.plot(etas, curve / etas, "-", color=color, label=f"{label}: (J(theta + eta E[g]) - J) / eta")
            ax.axhline(slope, color=color, ls="--", alpha=0.7, label=f"{label}: first order <grad J, E[g]>")
        ax.set_xscale("log")
        verdict = "holds" if case["assumption"] > ASSUMPTION_TOL else "fails"
        ax.set_title(f"{name} ({case['rule']})\nE[A~] = {_signed(case['assumption'])}: assumption {verdict}", fontsize=9)
        ax.set_xlabel("step size eta")
        ax.set_ylabel("improvement of J / eta")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Theorem 1 on a softmax bandit: exact expected updates, GRPO vs Guide-GRPO")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_guide.theory", description="Theorem 1 (Guide-GRPO vs GRPO, first-order improvement) checked exactly on a softmax bandit")
    parser.add_argument("--out", type=Path, help="write the figure (improvement vs eta per case) to this PNG")
    parser.add_argument("--k", type=int, default=4, help="rollouts per prompt (default 4)")
    parser.add_argument("--eta", type=float, nargs="+", help="step sizes of the table (default 0.01 0.1 0.3 1 3)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k {args.k}: give a whole number >= 1")
    all_cases = cases(args.k)
    if args.eta:
        all_cases = [Case(c.name, c.bandit, c.guide, c.shows, tuple(args.eta)) for c in all_cases]
    rows = [row for case in all_cases for row in evaluate(case)]
    print(format_table(rows))
    print()
    for case in all_cases:
        print(f"- {case.name}: {case.shows}")
    if args.out:
        etas = torch.logspace(-3, 1, 60, dtype=DTYPE)
        curves = {}
        for case in all_cases:
            g = {"grpo": expected_update(case.bandit, case.baseline), "guide": expected_update(case.bandit, case.guide)}
            grad = return_gradient(case.bandit)
            curves[case.name] = {
                "dJ_grpo": torch.stack([improvement(case.bandit, g["grpo"], float(e)) for e in etas]),
                "dJ_guide": torch.stack([improvement(case.bandit, g["guide"], float(e)) for e in etas]),
                "slope_grpo": float(grad @ g["grpo"]),
                "slope_guide": float(grad @ g["guide"]),
                "assumption": float(assumption_value(case.bandit, case.guide)),
                "rule": case.guide.describe(),
            }
        print(f"\nwrote {plot(curves, args.out, etas)}")
    return 0
