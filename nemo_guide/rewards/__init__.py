"""Verifiers: strings in, rewards out. No tensors, no model code."""

from nemo_guide.rewards.exact import ExactAnswerReward, exact_answer_reward
from nemo_guide.rewards.math import MathReward, VerifierPool, extract_answer, format_reward, math_reward

__all__ = ["ExactAnswerReward", "MathReward", "exact_answer_reward", "VerifierPool", "extract_answer", "format_reward", "math_reward"]


def make_reward(name: str, *, num_workers: int = 1):
    """``"math"`` (math-verify, boxed or <answer>) or ``"exact"`` (text after the last ``A:``)."""
    if name == "math":
        return MathReward(num_workers=num_workers)
    if name == "exact":
        return ExactAnswerReward()
    raise ValueError(f"unknown reward {name!r}; choose 'math' or 'exact'")
