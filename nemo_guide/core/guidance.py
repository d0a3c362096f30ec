"""Which prompts get guided rollouts, and how guided rollouts join their group.

Paper: Algorithm 1 lines 8-10 (guidance when all k plain rollouts fail) and Table 3
(the guidance-threshold ablation). The group layout follows DESIGN section 4:
``"union"`` is the paper's S(q) in Eq. 6 (k failed plain + k guided rollouts share one
group); ``"replace"`` is the authors' ``guide_rl`` code (the guided rollouts replace the
failed group, whose plain rollouts are not trained on).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import torch

from nemo_guide.core.registry import Registry


class GuidanceThreshold(str, Enum):
    ALL_INCORRECT = "all_incorrect"
    """No plain rollout of the prompt is correct (the paper's default)."""
    MOSTLY_INCORRECT = "mostly_incorrect"
    """Fewer than 25% of the plain rollouts are correct (Table 3)."""
    ALWAYS = "always"
    """Every prompt is guided (Table 3)."""
    NEVER = "never"
    """No prompt is guided: vanilla GRPO."""


class GuidedGroupMode(str, Enum):
    UNION = "union"
    """Guided rollouts join the failed plain ones in one group (paper, Eq. 6). Default."""
    REPLACE = "replace"
    """Guided rollouts form the group alone; the failed plain ones are dropped (``guide_rl``)."""


MOSTLY_INCORRECT_FRACTION = 0.25

THRESHOLDS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("guidance threshold", GuidanceThreshold)


@THRESHOLDS.register(GuidanceThreshold.ALL_INCORRECT)
def _all_incorrect(correct: torch.Tensor) -> torch.Tensor:
    return ~correct.any(dim=1)


@THRESHOLDS.register(GuidanceThreshold.MOSTLY_INCORRECT)
def _mostly_incorrect(correct: torch.Tensor) -> torch.Tensor:
    return correct.float().mean(dim=1) < MOSTLY_INCORRECT_FRACTION


@THRESHOLDS.register(GuidanceThreshold.ALWAYS)
def _always(correct: torch.Tensor) -> torch.Tensor:
    return torch.ones(correct.shape[0], dtype=torch.bool, device=correct.device)


@THRESHOLDS.register(GuidanceThreshold.NEVER)
def _never(correct: torch.Tensor) -> torch.Tensor:
    return torch.zeros(correct.shape[0], dtype=torch.bool, device=correct.device)


def select_for_guidance(correct: torch.Tensor, threshold: str | GuidanceThreshold) -> torch.Tensor:
    """Prompts that get k guided rollouts.

    Args:
        correct: whether each plain rollout was verified correct. Shape: ``[B, G]``, bool.
        threshold: a :class:`GuidanceThreshold` name.

    Returns:
        Shape: ``[B]``, bool; True where the prompt is guided.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must have shape [B, G], got {tuple(correct.shape)}")
    if correct.shape[1] == 0:
        raise ValueError("correct has G = 0 rollouts per prompt; the group size must be >= 1")
    return THRESHOLDS[threshold](correct.bool())


def assemble_groups(
    guided_prompts: torch.Tensor,
    group_size: int,
    mode: str | GuidedGroupMode = GuidedGroupMode.UNION,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group ids, guided flags and train mask for a batch laid out plain-first.

    The batch holds ``B*G`` plain rollouts (prompt-major: rollout ``j`` of prompt ``b``
    at row ``b*G + j``) followed by ``M*G`` guided rollouts of the ``M`` guided prompts,
    in increasing prompt order. Group ids are prompt indices.

    Args:
        guided_prompts: Shape: ``[B]``, bool (from :func:`select_for_guidance`).
        group_size: ``G``, rollouts per prompt and per guided re-roll.
        mode: ``"union"`` keeps the failed plain rollouts in the group and in training;
            ``"replace"`` takes them out of both (their ``train_mask`` is False and their
            group id is ``-1`` so that they join no advantage statistics).

    Returns:
        ``(group, guided, train_mask)``, each of shape ``[N]`` with ``N = (B + M) * G``:
        group id (long), whether the row is a guided rollout, and whether it is trained on.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    mode = GuidedGroupMode(mode)
    num_prompts = guided_prompts.shape[0]
    device = guided_prompts.device
    prompt_ids = torch.arange(num_prompts, device=device)
    plain_group = prompt_ids.repeat_interleave(group_size)  # [B*G]
    guided_group = prompt_ids[guided_prompts.bool()].repeat_interleave(group_size)  # [M*G]
    group = torch.cat([plain_group, guided_group])
    guided = torch.cat(
        [torch.zeros_like(plain_group, dtype=torch.bool), torch.ones_like(guided_group, dtype=torch.bool)]
    )
    train_mask = torch.ones_like(guided)
    if mode is GuidedGroupMode.REPLACE:
        replaced = guided_prompts.bool().repeat_interleave(group_size)  # [B*G]
        train_mask[: plain_group.numel()] = ~replaced
        group[: plain_group.numel()][replaced] = -1
    return group, guided, train_mask
