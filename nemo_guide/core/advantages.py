"""Group-relative advantages (paper Eq. 3, over the group S(q) of Eq. 6).

All rollouts sharing a group id, plain and guided, are normalised together. Rows with a
negative group id belong to no group (e.g. the failed plain rollouts that a guided
re-roll replaced in ``guided_group="replace"``) and get advantage 0.
"""

from __future__ import annotations

import torch


def _group_index(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dense indices for the group ids. Returns ``(valid [N], index [N], K)``.

    All negative ids share one slot; it holds no valid row, so its statistics are unused.
    """
    ids, index = torch.unique(group.clamp(min=-1), return_inverse=True)
    return group >= 0, index, ids.numel()


def _group_stats(rewards: torch.Tensor, group: torch.Tensor):
    valid, index, num_groups = _group_index(group)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    ones = valid.to(rewards.dtype)
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, index, ones)  # [K]
    total = torch.zeros_like(count).index_add_(0, index, r)  # [K]
    mean = total / count.clamp(min=1)  # [K]
    big = torch.finfo(rewards.dtype).max
    hi = torch.full_like(count, -big).scatter_reduce(0, index, torch.where(valid, rewards, torch.full_like(r, -big)), "amax")
    lo = torch.full_like(count, big).scatter_reduce(0, index, torch.where(valid, rewards, torch.full_like(r, big)), "amin")
    return valid, index, count, mean, hi == lo


def group_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` over the rollouts of each group.

    Args:
        rewards: scalar reward of each rollout. Shape: ``[N]``, float.
        group: group id of each rollout (the prompt it belongs to); rows with a negative
            id are in no group and get 0. Shape: ``[N]``, long.
        normalize_std: divide by the group's unbiased sample standard deviation (GRPO,
            verl, ``guide_rl``); False subtracts the mean only (Dr. GRPO).
        eps: added to the standard deviation.

    Returns:
        Shape: ``[N]``, the advantage of each rollout, broadcast later to its tokens.
        A group whose rewards are all equal (including a group of one) gets exactly 0.
    """
    if rewards.shape != group.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group must both have shape [N], got {tuple(rewards.shape)} and {tuple(group.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    valid, index, count, mean, flat = _group_stats(rewards, group)
    centred = rewards - mean[index]  # [N]
    if normalize_std:
        sq = torch.zeros_like(count).index_add_(0, index, torch.where(valid, centred**2, torch.zeros_like(centred)))
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # [K], unbiased
        centred = centred / (std[index] + eps)
    return torch.where(valid & ~flat[index], centred, torch.zeros_like(centred))


def equal_reward_groups(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Whether each rollout's group has all-equal rewards (what Filter-GRPO drops).

    Args:
        rewards: Shape: ``[N]``.
        group: Shape: ``[N]``, long; negative ids count as flat (nothing to learn).

    Returns:
        Shape: ``[N]``, bool.
    """
    if rewards.shape != group.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group must both have shape [N], got {tuple(rewards.shape)} and {tuple(group.shape)}")
    valid, index, _, _, flat = _group_stats(rewards.float(), group)
    return ~valid | flat[index]
