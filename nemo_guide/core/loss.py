"""The Guide policy loss: dual-context importance ratio, clipping, shaping, aggregation.

Per token ``w = exp(logprobs - old_logprobs)`` where ``logprobs`` is
log pi_theta(o_t | plain prompt, o_<t) and ``old_logprobs`` is
log pi_old(o_t | sampling prompt, o_<t) (the hinted prompt for guided rollouts):
paper Eq. 6. Plain rollouts get the PPO clipped surrogate; guided rollouts get the
unclipped ``-s(w) * A`` (paper Appendix D: clipping guided tokens was unstable), with
``s`` an optional reshaping (Appendix E, LUFFY, the authors' ``guide_rl`` code).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import torch

from nemo_guide.core.kl import kl_penalty
from nemo_guide.core.registry import Registry

# Upper clamp of log-ratios before exp (as verl does): exp(20) ~ 4.9e8. There is no lower
# clamp: ratios of 1e-9 on hint-supplied tokens are real and must stay visible.
LOG_RATIO_MAX = 20.0
# The shaping percentile gamma is clamped to at least this (DESIGN section 4).
GAMMA_MIN = 1e-4
# Guided tokens with a ratio below this are counted in ``guided/frac_ratio_below_1e-3``:
# their gradient is scaled by w, so the hint's decisive tokens are effectively untrained.
TINY_RATIO = 1e-3
GUIDED_QUANTILES = (0.1, 0.5, 0.9)


class Shaping(str, Enum):
    NONE = "none"
    """``s(w) = w``: the paper's Eq. 6."""
    PERCENTILE = "percentile"
    """``s(w) = w / (w + gamma)``, gamma = the ``shaping_gamma`` quantile of guided ratios."""
    CONSTANT = "constant"
    """``s(w) = w / (w + gamma)``, gamma = ``shaping_gamma`` (LUFFY)."""


class ShapingScope(str, Enum):
    """Where the ``percentile`` shaping takes its quantile.

    The authors' ``guide_rl`` code takes one quantile per call of its loss, which runs once
    per micro-batch, and their paper runs use micro-batch size 1: in effect one quantile per
    rollout, as Appendix E states. Their function cannot run with a larger micro-batch and
    their per-rollout guided mask, so ``BATCH`` over several rollouts is a variant of ours.
    """

    BATCH = "batch"
    """One percentile over all guided, counted tokens of the call (one micro-batch in the loop)."""
    ROLLOUT = "rollout"
    """One percentile per guided rollout over its counted tokens: paper Appendix E and the
    authors' effective behaviour. The config's default (``algorithm.shaping_scope``)."""


class Aggregation(str, Enum):
    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    PAPER = "paper"


AggregationFn = Callable[[torch.Tensor, torch.Tensor, "int | None", "int | None"], torch.Tensor]
AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation", Aggregation)


@AGGREGATIONS.register(Aggregation.TOKEN_MEAN)
def _token_mean(values, mask, num_prompts, group_size):
    return values.sum() / mask.sum().clamp(min=1)


@AGGREGATIONS.register(Aggregation.SEQ_MEAN_TOKEN_MEAN)
def _seq_mean_token_mean(values, mask, num_prompts, group_size):
    per_seq = values.sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    has_tokens = mask.any(-1)
    return per_seq.sum() / has_tokens.sum().clamp(min=1)


@AGGREGATIONS.register(Aggregation.SEQ_MEAN_TOKEN_SUM)
def _seq_mean_token_sum(values, mask, num_prompts, group_size):
    per_seq = values.sum(-1)  # [N]
    return per_seq.sum() / mask.any(-1).sum().clamp(min=1)


@AGGREGATIONS.register(Aggregation.PAPER)
def _paper(values, mask, num_prompts, group_size):
    if num_prompts is None or group_size is None:
        raise ValueError(
            "aggregation='paper' divides by num_prompts * group_size (Eq. 6: a guided prompt's 2k "
            "rollouts count over k); pass num_prompts= and group_size= for the whole mini-batch"
        )
    per_seq = values.sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    return per_seq.sum() / max(num_prompts * group_size, 1)


def aggregate(
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    aggregation: str | Aggregation = Aggregation.TOKEN_MEAN,
    *,
    num_prompts: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Reduce per-token values to a scalar.

    Args:
        values: Shape: ``[N, L]``; entries where ``loss_mask`` is False are ignored.
        loss_mask: True where a token counts. Shape: ``[N, L]``, bool.
        aggregation: ``"token-mean"`` (mean over all counted tokens),
            ``"seq-mean-token-mean"`` (mean over rollouts with a counted token of their
            token-mean), ``"seq-mean-token-sum"`` (same with token sums), ``"paper"``
            (sum over rollouts of their token-mean / ``num_prompts * group_size``).

    Returns:
        A 0-dim tensor; with no counted token it is 0 and still attached to ``values``.
    """
    mask = loss_mask.bool()
    # where, not multiply: a NaN or inf at a masked position must not leak into the sum.
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return AGGREGATIONS[aggregation](values, mask.to(values.dtype), num_prompts, group_size)


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float, *, per_row: bool) -> torch.Tensor:
    """Linear-interpolated quantile of the entries where ``mask`` is True (``torch.quantile``'s rule).

    Unlike ``torch.quantile`` it has no input-size limit. Empty selections give NaN.

    Args:
        values: Shape: ``[N, L]``.
        mask: Shape: ``[N, L]``, bool.
        q: in ``[0, 1]``.
        per_row: one quantile per row (Shape: ``[N]``) or one over all selected entries (0-dim).
    """
    if per_row:
        sorted_vals, _ = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(dim=-1)  # [N, L]
        count = mask.sum(-1)  # [N]
    else:
        sorted_vals = values[mask].sort().values.unsqueeze(0)  # [1, T]
        count = mask.sum().reshape(1)  # [1]
    pos = q * (count - 1).clamp(min=0).to(values.dtype)  # [R]
    lo = pos.floor().long()
    hi = pos.ceil().long()
    if sorted_vals.shape[-1] == 0:
        out = torch.full(count.shape, float("nan"), dtype=values.dtype, device=values.device)
    else:
        a = sorted_vals.gather(-1, lo.clamp(max=sorted_vals.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        b = sorted_vals.gather(-1, hi.clamp(max=sorted_vals.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        out = a + (b - a) * (pos - lo.to(values.dtype))
        out = torch.where(count > 0, out, torch.full_like(out, float("nan")))
    return out if per_row else out.squeeze(0)


def shape_ratios(
    ratio: torch.Tensor,
    guided_mask: torch.Tensor,
    shaping: str | Shaping = Shaping.NONE,
    shaping_gamma: float = 0.9,
    shaping_scope: str | ShapingScope = ShapingScope.BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape guided-token ratios: ``s(w) = w`` or ``w / (w + gamma)``.

    Args:
        ratio: per-token importance ratio ``w``. Shape: ``[N, L]``.
        guided_mask: counted tokens of guided rollouts. Shape: ``[N, L]``, bool.
        shaping: ``"none"``, ``"percentile"`` or ``"constant"``.
        shaping_gamma: the quantile (``"percentile"``) or the constant gamma (``"constant"``).
        shaping_scope: ``"batch"`` (one quantile over every guided token of the call) or
            ``"rollout"`` (one per guided row); ``"percentile"`` only. See :class:`ShapingScope`.

    Returns:
        ``(shaped, gamma)``: ``shaped`` has shape ``[N, L]`` (equal to ``ratio`` outside
        ``guided_mask``); ``gamma`` has shape ``[N]``, the gamma each row used (detached;
        1 for rows without guided tokens, NaN-free).
    """
    shaping = Shaping(shaping)
    n = ratio.shape[0]
    if shaping is Shaping.NONE:
        return ratio, torch.zeros(n, dtype=ratio.dtype, device=ratio.device)
    if shaping is Shaping.CONSTANT:
        gamma = torch.full((n,), float(shaping_gamma), dtype=ratio.dtype, device=ratio.device)
    else:
        detached = ratio.detach()
        if ShapingScope(shaping_scope) is ShapingScope.ROLLOUT:
            gamma = masked_quantile(detached, guided_mask, shaping_gamma, per_row=True)  # [N]
        else:
            gamma = masked_quantile(detached, guided_mask, shaping_gamma, per_row=False).expand(n)  # [N]
        gamma = torch.nan_to_num(gamma, nan=1.0).clamp(min=GAMMA_MIN)
    g = gamma.unsqueeze(-1)  # [N, 1]
    shaped = torch.where(guided_mask, ratio / (ratio + g), ratio)
    return shaped, gamma


def _ratio_stats(prefix: str, ratio: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor, total: torch.Tensor) -> dict:
    """Token fraction, clip fraction and ratio mean/min/max over ``mask`` (NaN when empty); no host sync."""
    n = mask.sum()
    has = n > 0
    nan = torch.full((), float("nan"), dtype=ratio.dtype, device=ratio.device)
    inf = torch.full((), float("inf"), dtype=ratio.dtype, device=ratio.device)
    return {
        f"{prefix}/token_frac": n.to(ratio.dtype) / total.clamp(min=1),
        f"{prefix}/clip_frac": (clipped & mask).sum().to(ratio.dtype) / n.clamp(min=1),
        f"{prefix}/ratio_mean": torch.where(has, torch.where(mask, ratio, 0).sum() / n.clamp(min=1), nan),
        f"{prefix}/ratio_min": torch.where(has, torch.where(mask, ratio, inf).amin(), nan),
        f"{prefix}/ratio_max": torch.where(has, torch.where(mask, ratio, -inf).amax(), nan),
    }


def guide_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    guided: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_guided: bool = False,
    shaping: str | Shaping = Shaping.NONE,
    shaping_gamma: float = 0.9,
    shaping_scope: str | ShapingScope = ShapingScope.BATCH,
    aggregation: str | Aggregation = Aggregation.TOKEN_MEAN,
    num_prompts: int | None = None,
    group_size: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Guide-GRPO surrogate loss (to minimise), paper Eq. 6.

    Args:
        logprobs: log pi_theta(o_t | plain prompt, o_<t), from the training forward.
            Shape: ``[N, L]``.
        old_logprobs: log pi_old(o_t | sampling prompt, o_<t), computed once before any
            update (the hinted prompt for guided rows). Shape: ``[N, L]``.
        advantages: per rollout (Shape: ``[N]``) or per token (Shape: ``[N, L]``).
        loss_mask: True where a token counts. Shape: ``[N, L]``, bool.
        guided: True for rollouts sampled with a hint. Shape: ``[N]``, bool.
        clip_low, clip_high: PPO clip range ``[1 - clip_low, 1 + clip_high]``.
        clip_guided: clip guided tokens too (the paper's ablation; off by default).
        shaping, shaping_gamma, shaping_scope: see :func:`shape_ratios`; guided tokens only.
            ``shaping_scope`` defaults to ``"batch"`` here, as DESIGN section 4 fixes this
            signature; the config's ``algorithm.shaping_scope`` defaults to ``"rollout"``
            (paper Appendix E, and the authors' runs in effect) and the loop always passes it.
        aggregation, num_prompts, group_size: see :func:`aggregate`.
        ref_logprobs: log pi_ref on the plain prompt for the KL term. Shape: ``[N, L]``.
        kl_coef: weight of the KL term (paper: 0); needs ``ref_logprobs`` when > 0.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        entropy: per-token entropy of pi_theta on the plain prompt. Shape: ``[N, L]``.
        entropy_coef: weight of the entropy bonus (subtracted from the loss; paper: 0).
        is_weights: per-token importance weights on the policy term (detached), e.g.
            truncated importance sampling against the rollout engine
            (:func:`nemo_guide.core.mismatch.truncated_importance_weights`). Shape: ``[N, L]``.
            None: weight 1 (the paper).

    Returns:
        ``(loss, metrics)``: a 0-dim loss (zero but attached to the graph when no token
        counts) and detached 0-dim tensors: ``loss/*`` parts, and per rollout kind
        (``plain/``, ``guided/``) ``token_frac``, ``clip_frac``, ``ratio_mean/min/max``;
        for guided tokens also ``ratio_p10/p50/p90``, ``frac_ratio_below_1e-3`` and the
        shaping ``gamma``. Statistics of an empty set are NaN; fractions are 0.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != loss_mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must all have shape [N, L]"
        )
    n = logprobs.shape[0]
    if guided.shape != (n,):
        raise ValueError(f"guided must have shape [N] = [{n}], got {tuple(guided.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [N, 1]
    if advantages.shape[0] != n or advantages.dim() != 2:
        raise ValueError(f"advantages must have shape [N] or [N, L] with N = {n}, got {tuple(advantages.shape)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (log pi_ref on the plain prompt)")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")

    mask = loss_mask.bool()
    guided_rows = guided.bool().unsqueeze(-1)  # [N, 1]
    guided_mask = mask & guided_rows  # [N, L]
    plain_mask = mask & ~guided_rows  # [N, L]
    advantages = advantages.detach().to(logprobs.dtype)

    # Masked positions may hold padding garbage (even -inf): zero them before any exp.
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logprobs = torch.where(mask, logprobs, zero)
    log_ratio = logprobs - torch.where(mask, old_logprobs.detach(), zero)  # [N, L]
    ratio = log_ratio.clamp(max=LOG_RATIO_MAX).exp()  # [N, L]

    shaped, gamma = shape_ratios(ratio, guided_mask, shaping, shaping_gamma, shaping_scope)
    unclipped = -advantages * shaped  # [N, L]
    clipped = -advantages * shaped.clamp(1.0 - clip_low, 1.0 + clip_high)  # [N, L]
    ppo = torch.maximum(unclipped, clipped)
    use_clip = ~guided_rows | clip_guided  # [N, 1]
    token_loss = torch.where(use_clip, ppo, unclipped)  # [N, L]
    if is_weights is not None:
        if is_weights.shape != token_loss.shape:
            raise ValueError(f"is_weights must have shape [N, L] = {tuple(token_loss.shape)}, got {tuple(is_weights.shape)}")
        token_loss = token_loss * is_weights.detach().to(token_loss.dtype)
    clip_active = (clipped > unclipped) & use_clip  # [N, L]

    agg = dict(aggregation=aggregation, num_prompts=num_prompts, group_size=group_size)
    policy_loss = aggregate(token_loss, mask, **agg)
    loss = policy_loss
    metrics: dict[str, torch.Tensor] = {"loss/policy": policy_loss.detach()}
    if ref_logprobs is not None:
        kl = aggregate(kl_penalty(logprobs, torch.where(mask, ref_logprobs, zero), kl_estimator), mask, **agg)
        loss = loss + kl_coef * kl
        metrics["loss/kl"] = kl.detach()
    if entropy is not None:
        ent = aggregate(entropy, mask, **agg)
        loss = loss - entropy_coef * ent
        metrics["loss/entropy"] = ent.detach()
    metrics["loss/total"] = loss.detach()

    with torch.no_grad():
        total = mask.sum()
        metrics.update(_ratio_stats("plain", ratio, plain_mask, clip_active, total))
        metrics.update(_ratio_stats("guided", ratio, guided_mask, clip_active, total))
        for q in GUIDED_QUANTILES:
            metrics[f"guided/ratio_p{round(q * 100)}"] = masked_quantile(ratio, guided_mask, q, per_row=False)
        metrics["guided/frac_ratio_below_1e-3"] = (guided_mask & (ratio < TINY_RATIO)).sum().to(ratio.dtype) / guided_mask.sum().clamp(min=1)
        has_guided = guided_mask.any(-1)  # [N]
        num_guided_rows = has_guided.sum()
        metrics["guided/shaping_gamma"] = torch.where(
            num_guided_rows > 0,
            torch.where(has_guided, gamma, 0).sum() / num_guided_rows.clamp(min=1),
            torch.full((), float("nan"), dtype=ratio.dtype, device=ratio.device),
        )
    return loss, metrics
