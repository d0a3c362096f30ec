"""Verifiers: strings in, rewards out. No tensors, no model code."""

from nemo_guide.rewards.math import MathReward, VerifierPool, extract_answer, format_reward, math_reward

__all__ = ["MathReward", "VerifierPool", "extract_answer", "format_reward", "math_reward"]
