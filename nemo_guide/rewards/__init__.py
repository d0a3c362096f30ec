"""Verifiers: strings in, rewards out. No tensors, no model code."""

from __future__ import annotations

from typing import Protocol, Sequence

from nemo_guide.rewards.exact import ExactAnswerReward, exact_answer_reward
from nemo_guide.rewards.math import MathReward, VerifierPool, extract_answer, format_reward, math_reward

__all__ = [
    "CORRECT_ABOVE",
    "ExactAnswerReward",
    "MathReward",
    "RewardFn",
    "VerifierPool",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "is_correct",
    "make_reward",
    "math_reward",
]

CORRECT_ABOVE = 0.5
"""A rollout counts as correct (guidance, pass@k, evaluation) when its reward exceeds this."""


def is_correct(reward: float) -> bool:
    """The one correctness rule for a reward in [0, 1]."""
    return reward > CORRECT_ABOVE


class RewardFn(Protocol):
    """``reward_fn(prompts, completions, answers=...) -> list[float]`` (STYLE point 14), plus ``close()``."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], *, answers: Sequence[str]) -> list[float]:
        """One reward per completion, in order."""

    def close(self) -> None:
        """Release worker processes; the function is not called afterwards."""


def make_reward(name: str, *, num_workers: int = 1) -> RewardFn:
    """``"math"`` (math-verify, boxed or <answer>) or ``"exact"`` (text after the last ``A:``).

    ``num_workers``: verifier processes of the math reward (``data.reward_workers``).
    """
    if name == "math":
        return MathReward(num_workers=num_workers)
    if name == "exact":
        return ExactAnswerReward()
    raise ValueError(f"unknown reward {name!r}; choose 'math' or 'exact'")
