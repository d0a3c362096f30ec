"""KL penalty estimators against a reference policy (Schulman's k1, k2, k3).

The paper trains with KL coefficient 0 (Tables 9, 11); the term exists for users who
want it. It is evaluated on the *plain* prompt: ``logprobs`` come from the training
forward on the plain context and ``ref_logprobs`` from the reference policy on the same
plain context, so a guided rollout is regularised towards the reference's plain policy.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import torch

from nemo_guide.core.registry import Registry


class KLEstimator(str, Enum):
    K1 = "k1"
    """``log p - log q``: unbiased, high variance, can be negative."""
    K2 = "k2"
    """``0.5 (log p - log q)^2``: low variance, biased."""
    K3 = "k3"
    """``exp(log q - log p) - (log q - log p) - 1``: unbiased, non-negative (GRPO's choice)."""


KL_ESTIMATORS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("KL estimator", KLEstimator)

# log-ratios are clamped before exponentiation so that one wild token cannot overflow.
_LOG_RATIO_CLAMP = 20.0


@KL_ESTIMATORS.register(KLEstimator.K1)
def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


@KL_ESTIMATORS.register(KLEstimator.K2)
def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


@KL_ESTIMATORS.register(KLEstimator.K3)
def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    neg = (-log_ratio).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return neg.exp() - neg - 1.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str | KLEstimator = KLEstimator.K3) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate.

    Args:
        logprobs: log pi_theta(o_t | plain prompt, o_<t). Shape: ``[N, L]``.
        ref_logprobs: log pi_ref(o_t | plain prompt, o_<t). Shape: ``[N, L]``.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        Shape: ``[N, L]``; differentiable w.r.t. ``logprobs``.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have the same shape")
    return KL_ESTIMATORS[estimator](logprobs - ref_logprobs.detach())
