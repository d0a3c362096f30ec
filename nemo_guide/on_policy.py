"""On-policy updates: pi_old from the training forward (``algorithm.old_logprobs=reuse``).

When step 10 is one optimizer step on the weights that sampled (one epoch of one mini-batch),
pi_old(response | plain prompt) is what its own forward computes. The rows where that is the
denominator (:func:`old_from_current_rows`) skip step 9's forward
(:func:`nemo_guide.steps.with_old_logprobs` with ``current``); the batch flags them in
``RolloutBatch.old_from_current``, and the policy's ``train_step`` fills their ``old_logprobs``
with its log-probs, detached, right before the loss (``RolloutBatch.with_current_as_old``).
:func:`update_on_policy` runs that update and returns the forward's entropy, which is pi_old's,
for ``train/entropy`` (:func:`with_current_entropy`). Any host calls these, as the named steps.
"""

from __future__ import annotations

from typing import Iterator

import torch

from nemo_guide.backends.base import TRAIN_ENTROPY, LossFn, Policy, RolloutBatch
from nemo_guide.config import AlgorithmConfig


def trained_index(batch: RolloutBatch) -> torch.Tensor:
    """Shape: ``[n]``, long: the rows of ``batch`` with at least one token in the loss, in order."""
    return torch.nonzero(batch.loss_mask.any(-1)).squeeze(-1)


def old_from_current_rows(batch: RolloutBatch, algo: AlgorithmConfig, mini_batch_size: int | None) -> torch.Tensor:
    """The rows whose pi_old the training forward provides (``algorithm.old_logprobs=reuse``).

    The update is on-policy when it is one optimizer step on the pre-update weights: one epoch
    (``ppo_epochs = 1``) of one mini-batch (``mini_batch_size`` None or at least the trained
    rows). Then pi_old(response | plain prompt) is the training forward's log pi_theta, for
    every trained row whose pi_old context is its plain prompt: plain rollouts, and guided ones
    with ``old_logprob_context=plain``. Never with ``recompute``, SFT (its update is not on the
    rollouts), or ``rollout_correction=tis`` with ``old_logprob_context=sampling``: its
    weights, computed before the update, need pi_old of every row.

    Returns:
        Shape: ``[N]``, bool.
    """
    trained = batch.loss_mask.any(-1)  # [N]
    none = torch.zeros(len(batch), dtype=torch.bool)
    on_policy = algo.ppo_epochs == 1 and (mini_batch_size is None or mini_batch_size >= int(trained.sum()))
    needs_old_first = algo.rollout_correction != "none" and algo.old_logprob_context == "sampling"
    if algo.old_logprobs == "recompute" or algo.mode == "sft" or not on_policy or needs_old_first:
        return none
    if algo.old_logprob_context == "plain":
        return trained
    same_prompt = torch.tensor([p == s for p, s in zip(batch.plain_prompt_ids, batch.sample_prompt_ids, strict=True)], dtype=torch.bool)
    return trained & same_prompt


def mini_batches(n: int, *, epochs: int, mini_batch_size: int | None, seed: int) -> Iterator[torch.Tensor]:
    """The rows of each optimizer step of :func:`update`: per epoch a seeded shuffle of
    ``range(n)`` cut into ``mini_batch_size`` rows (None: all). Each Shape: ``[<= mini_batch_size]``."""
    size = mini_batch_size or n
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(epochs if n else 0):
        order = torch.randperm(n, generator=shuffle)
        for start in range(0, n, size):
            yield order[start : start + size]


def update_on_policy(policy: Policy, batch: RolloutBatch, loss_fn: LossFn, *, micro_batch_size: int, seed: int) -> tuple[list[dict[str, float]], torch.Tensor]:
    """Step 10 when the update is on-policy: :func:`update` with one epoch of one mini-batch
    (the same shuffle), scored with the entropy, which is pi_old's: the weights are still pi_old's.

    Returns:
        ``(metrics of the one optimizer step (none for an empty batch), entropy [n, L] in
        batch's row order)``; NaN rows where the policy reported none.
    """
    entropy = torch.full(batch.loss_mask.shape, float("nan"))  # [n, L]
    out = []
    for mini in mini_batches(len(batch), epochs=1, mini_batch_size=None, seed=seed):
        metrics = policy.train_step(batch.select(mini), loss_fn, micro_batch_size=micro_batch_size, with_entropy=True)
        if TRAIN_ENTROPY in metrics:
            entropy[mini] = metrics.pop(TRAIN_ENTROPY)
        out.append(metrics)
    return out, entropy


def with_current_entropy(entropy: torch.Tensor, batch: RolloutBatch, trained_entropy: torch.Tensor) -> torch.Tensor:
    """Step 9's pi_old entropy completed on the rows of ``batch.old_from_current`` by the
    training forward's (:func:`update_on_policy` on :func:`trained_rows`).

    Args:
        entropy: Shape: ``[N, L]``, NaN on ``old_from_current`` rows.
        trained_entropy: Shape: ``[n, L]``, the trained rows of ``batch`` in order.
    """
    if batch.old_from_current is None:
        return entropy
    rows = trained_index(batch)  # [n]
    out = entropy.clone()
    out[rows] = torch.where(batch.old_from_current[rows].unsqueeze(-1), trained_entropy, entropy[rows])
    return out
