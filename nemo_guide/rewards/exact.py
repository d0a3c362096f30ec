"""Exact-answer reward for synthetic tasks: the text after the last marker equals the answer."""

from __future__ import annotations

from typing import Sequence


def exact_answer_reward(completion: str, answer: str, marker: str = "A:") -> float:
    """1.0 if ``completion`` contains ``marker`` and what follows its last occurrence, stripped,
    equals ``answer`` stripped; else 0.0. (``"...;A:96"`` with answer ``"96"`` scores 1.)"""
    if marker not in completion:
        return 0.0
    return 1.0 if completion.rsplit(marker, 1)[1].strip() == answer.strip() else 0.0


class ExactAnswerReward:
    """``reward(prompts, completions, answers=...) -> list[float]`` with :func:`exact_answer_reward`."""

    def __init__(self, marker: str = "A:") -> None:
        self.marker = marker

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], *, answers: Sequence[str], **meta) -> list[float]:
        if not len(prompts) == len(completions) == len(answers):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(answers)} answers: give one of each per rollout")
        return [exact_answer_reward(c, a, self.marker) for _, c, a in zip(prompts, completions, answers, strict=True)]

    def close(self) -> None:
        """Nothing to release (the same interface as :class:`~nemo_guide.rewards.math.MathReward`)."""
