"""The sampled update the trainer computes on a bandit, to check the exact sums against (tests)."""

from __future__ import annotations

import torch

from nemo_guide.core.advantages import group_advantages
from nemo_guide.core.guidance import THRESHOLDS, GuidedGroupMode
from nemo_guide.core.loss import Aggregation, guide_policy_loss
from nemo_guide.theory.exact import Bandit, UpdateRule


def monte_carlo_update(bandit: Bandit, rule: UpdateRule, batches: int, generator: torch.Generator) -> torch.Tensor:
    """Mean over ``batches`` sampled steps of the update the trainer computes: sampled rollouts,
    :func:`select_for_guidance`'s rule, :func:`group_advantages`, and minus the gradient of
    :func:`guide_policy_loss` (``aggregation="paper"``, no clipping on guided rollouts) at theta_old.

    Returns:
        Shape: ``[D]``; tends to :func:`expected_update` as ``batches`` grows.
    """
    q, k = bandit.num_prompts, rule.k
    pi, sigma = bandit.plain_probs(), bandit.hinted_probs()
    n = batches * q  # independent (batch, prompt) draws, batch-major
    prompt = torch.arange(q).repeat(batches)  # [n]
    plain = torch.multinomial(pi[prompt], k, replacement=True, generator=generator)  # [n, k]
    hinted = torch.multinomial(sigma[prompt], k, replacement=True, generator=generator)  # [n, k]
    plain_r, hinted_r = bandit.rewards[prompt.unsqueeze(-1), plain], bandit.rewards[prompt.unsqueeze(-1), hinted]  # [n, k]
    fire = THRESHOLDS[rule.threshold](plain_r.bool())  # [n]
    ids = torch.arange(n).unsqueeze(-1).expand(n, k)  # [n, k]: one group per (batch, prompt)
    fire_k = fire.unsqueeze(-1).expand(n, k)  # [n, k]
    plain_group = ids if rule.group is GuidedGroupMode.UNION else torch.where(fire_k, -1, ids)
    hinted_group = torch.where(fire_k, ids, -1)
    group = torch.cat([plain_group.flatten(), hinted_group.flatten()])  # [2*n*k]
    rewards = torch.cat([plain_r.flatten(), hinted_r.flatten()])  # [2*n*k]
    adv = group_advantages(rewards, group, normalize_std=rule.normalize_std, eps=rule.eps)  # [2*n*k]

    theta = bandit.theta.clone().requires_grad_(True)
    logp = bandit.plain_logits(theta).log_softmax(-1)  # [Q, R]
    rows_prompt = prompt.unsqueeze(-1).expand(n, k).flatten().repeat(2)  # [2*n*k]
    response = torch.cat([plain.flatten(), hinted.flatten()])  # [2*n*k]
    guided = torch.cat([torch.zeros(n * k, dtype=torch.bool), torch.ones(n * k, dtype=torch.bool)])  # [2*n*k]
    old = torch.where(guided, sigma.log()[rows_prompt, response], pi.log()[rows_prompt, response])  # [2*n*k]
    loss, _ = guide_policy_loss(
        logp[rows_prompt, response].unsqueeze(-1),  # [2*n*k, 1]
        old.unsqueeze(-1),
        adv,
        (group >= 0).unsqueeze(-1),  # [2*n*k, 1]
        guided,
        clip_guided=False,
        aggregation=Aggregation.PAPER,
        num_prompts=n,
        group_size=k,
    )
    (grad,) = torch.autograd.grad(-loss, theta)
    return grad
