"""Sampler/trainer mismatch: truncated importance sampling and the engine probe's statistics.

A rollout engine (TensorRT-LLM) and the trainer (Megatron) run the same weights through
different kernels, so the distribution the tokens were *sampled* from, ``pi_sampler``,
is not exactly the ``pi_old`` the trainer computes for the same tokens. Guide-GRPO's
ratio ``pi_theta(o | plain) / pi_old(o | sampling prompt)`` assumes the two are equal.

Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework
secretly brings you off-policy RL training") reweights each counted token's policy loss
by ``min(pi_old / pi_sampler, C)``: the correction for sampling from ``pi_sampler``
instead of ``pi_old``, truncated at ``C`` so one token cannot dominate. For a guided
rollout the engine sampled behind the hint, so ``pi_old`` there is the trainer's
log-prob *behind the hinted prompt* (the caller passes those).

All functions take tensors and return tensors (no host sync); metrics are detached.
"""

from __future__ import annotations

from enum import Enum

import torch

from nemo_guide.core.loss import LOG_RATIO_MAX


class RolloutCorrection(str, Enum):
    """``algorithm.rollout_correction``: how the sampler/trainer mismatch is corrected."""

    NONE = "none"
    """No correction (the paper; exact when the sampler is the trainer)."""
    TIS = "tis"
    """Truncated importance sampling: per-token weights ``min(pi_old / pi_sampler, cap)``."""


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    guided: torch.Tensor,
    *,
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token TIS weights ``min(exp(trainer - sampler), cap)``, 1 where no token counts.

    Args:
        trainer_logprobs: log pi_old of each response token behind the prompt it was sampled
            with (the hinted prompt for guided rollouts). Shape: ``[N, L]``.
        sampler_logprobs: log pi_sampler of the same tokens, as the engine reported them.
            Shape: ``[N, L]``.
        loss_mask: True where a token counts. Shape: ``[N, L]``, bool.
        guided: True for rollouts sampled with a hint. Shape: ``[N]``, bool.
        cap: the truncation ``C`` (> 0; 2 in Yao et al.).

    Returns:
        ``(weights [N, L], metrics)``, both detached. Metrics (0-dim; NaN for an empty set,
        fractions 0): ``rollout/logprob_diff_mean`` and ``rollout/logprob_diff_max`` (of
        ``|trainer - sampler|`` over counted tokens), ``rollout/logprob_diff_mean_guided``,
        ``rollout/tis_clip_frac`` (tokens whose ratio exceeded ``cap``) and
        ``rollout/tis_weight_mean``.
    """
    if trainer_logprobs.shape != sampler_logprobs.shape or trainer_logprobs.shape != loss_mask.shape or loss_mask.dim() != 2:
        raise ValueError(
            f"trainer_logprobs {tuple(trainer_logprobs.shape)}, sampler_logprobs {tuple(sampler_logprobs.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must all have shape [N, L]"
        )
    if guided.shape != loss_mask.shape[:1]:
        raise ValueError(f"guided must have shape [N] = [{loss_mask.shape[0]}], got {tuple(guided.shape)}")
    if not cap > 0:
        raise ValueError(f"cap = {cap}: the truncation must be > 0 (2 in Yao et al.)")
    mask = loss_mask.bool()
    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        diff = torch.where(mask, trainer_logprobs.float() - sampler_logprobs.float(), zero)  # [N, L]
        ratio = diff.clamp(max=LOG_RATIO_MAX).exp()
        weights = torch.where(mask, ratio.clamp(max=cap), torch.ones_like(ratio))
        gap = diff.abs()
        guided_mask = mask & guided.bool()[:, None]
        nan = torch.full((), float("nan"), device=mask.device)
        metrics = {
            "rollout/logprob_diff_mean": torch.where(mask.any(), _masked_mean(gap, mask), nan),
            "rollout/logprob_diff_max": torch.where(mask.any(), torch.where(mask, gap, -1.0).amax(), nan),
            "rollout/logprob_diff_mean_guided": torch.where(guided_mask.any(), _masked_mean(gap, guided_mask), nan),
            "rollout/tis_clip_frac": _masked_mean((ratio > cap).float(), mask),
            "rollout/tis_weight_mean": torch.where(mask.any(), _masked_mean(weights, mask), nan),
        }
    return weights, metrics


def logprob_gap(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``|sampler - trainer|`` per counted token: its mean, max and the token count (0-dim tensors).

    Args:
        sampler_logprobs, trainer_logprobs: Shape: ``[B, L]``.
        mask: True on response tokens. Shape: ``[B, L]``, bool.
    """
    mask = mask.bool()
    gap = torch.where(mask, (sampler_logprobs.float() - trainer_logprobs.float()).abs(), 0)
    nan = torch.full((), float("nan"), device=mask.device)
    return {
        "mean": torch.where(mask.any(), gap.sum() / mask.sum().clamp(min=1), nan),
        "max": torch.where(mask.any(), gap.amax() if gap.numel() else nan, nan),
        "tokens": mask.sum(),
    }


def greedy_disagreement(engine_tokens: torch.Tensor, engine_lengths: torch.Tensor, trainer_tokens: torch.Tensor, trainer_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decisions two decoders took on the same prefixes, and how many differed.

    Row ``b``'s positions are compared from the first response token up to and including
    the first one where the tokens differ (a sequence that has ended counts as differing
    from one that goes on), and no further: after a divergence the prefixes differ, so
    later tokens are not comparable decisions. Each row thus contributes at most one
    disagreement.

    Args:
        engine_tokens, trainer_tokens: greedy response tokens. Shape: ``[B, L]`` each (any
            value beyond a row's length).
        engine_lengths, trainer_lengths: tokens per row. Shape: ``[B]``.

    Returns:
        ``(decisions, disagreements)``: 0-dim long tensors.
    """
    width = max(engine_tokens.shape[1], trainer_tokens.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731  [B, L] -> [B, W]
    pos = torch.arange(width, device=engine_tokens.device)[None, :]  # [1, W]
    e_live, t_live = pos < engine_lengths[:, None], pos < trainer_lengths[:, None]  # [B, W]
    either = e_live | t_live
    differ = either & ((e_live != t_live) | (pad(engine_tokens) != pad(trainer_tokens)))  # [B, W]
    has = differ.any(-1)  # [B]
    first = torch.where(has, differ.float().argmax(-1), either.sum(-1) - 1)  # [B] last compared position
    decisions = (first + 1).clamp(min=0).sum()
    return decisions, has.sum()
