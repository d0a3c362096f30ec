"""Data-parallel shares and gathers of a NeMo-Aligner run (torch.distributed and megatron-core only).

Every rank holds the same global lists; replica ``r`` of ``dp`` works on the contiguous
share :func:`share_of` gives it, and :func:`gather_in_order` puts the replicas' results back
in the global order. Ranks of one model-parallel group share a replica and its results.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_guide.rewards import RewardFn


def share_of(n: int, dp: int, rank: int) -> list[int]:
    """The indices of ``range(n)`` that data-parallel replica ``rank`` of ``dp`` works on:
    contiguous, sizes differing by at most one, earlier replicas taking the larger shares."""
    if not 0 <= rank < dp:
        raise ValueError(f"data-parallel rank {rank} is outside 0..{dp - 1}")
    base, extra = divmod(n, dp)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def gather_in_order(items: Sequence[Any]) -> list[Any]:
    """This replica's ``items`` and every other replica's, concatenated in replica order
    (the inverse of :func:`share_of`); on every rank."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return list(items)
    out: list[Any] = [None] * dp
    dist.all_gather_object(out, list(items), group=parallel_state.get_data_parallel_group())
    return [x for part in out for x in part]


class SourceRankReward:
    """A reward function run where the verifier should run once per model-parallel group.

    Each data-parallel replica scores its share of the completions on its model-parallel
    source rank (tensor rank 0 of the first pipeline stage), broadcasts the rewards to the
    rest of its group, and the shares are gathered: every rank returns all rewards, and each
    completion is verified exactly once in the whole job.
    """

    def __init__(self, reward_fn: RewardFn) -> None:
        self.reward_fn = reward_fn

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], *, answers: Sequence[str]) -> list[float]:
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = share_of(len(completions), dp, rank)
        group = parallel_state.get_model_parallel_group()
        rewards = torch.zeros(len(mine), dtype=torch.float64, device=torch.cuda.current_device())
        if dist.get_rank(group) == 0 and mine:
            pick = lambda xs: [xs[i] for i in mine]  # noqa: E731
            rewards = torch.tensor(self.reward_fn(pick(prompts), pick(completions), answers=pick(answers)), dtype=torch.float64, device=rewards.device)
        if dist.get_world_size(group) > 1:
            dist.broadcast(rewards, src=dist.get_global_rank(group, 0), group=group)
        return [float(r) for r in gather_in_order(rewards.cpu().tolist())]

    def close(self) -> None:
        self.reward_fn.close()
