"""Algorithm 1's steps as functions that every host trainer calls.

The embedded loop (``nemo_guide.loop.train``) composes them; the NeMo-Aligner trainer
calls the same ones on its globally gathered batch. Each takes the protocol it needs
(``backends.base``), plain tensors and the config sections it reads, and returns plain
data, so a host decides only where things run:

==========================  ======================================================
:func:`sample_and_score`    steps 2-3 and 5-6: k rollouts per prompt, verified
:func:`choose_guidance`     step 4: which prompts get k hinted rollouts
:func:`groups_and_advantages`  steps 7-8: groups S(q), advantages, Filter-GRPO
:func:`dual_context_batch`  the batch of DESIGN section 3 (plain + sampling prompt)
:func:`with_old_logprobs`   step 9: pi_old behind the sampling prompt (and pi_ref)
:func:`update`              step 10: ``mu`` epochs of mini-batch updates
:func:`step_metrics`        step 11: the logged metrics of one step
==========================  ======================================================

An on-policy update takes pi_old of rows sampled behind the plain prompt from its own forward
instead of step 9's (``algorithm.old_logprobs=reuse``): :mod:`nemo_guide.on_policy`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from nemo_guide.backends.base import TRAIN_ENTROPY, Generator, LogprobGenerator, LossFn, Policy, PromptTokenizer, RolloutBatch, Totals
from nemo_guide.config import AlgorithmConfig, GenerationConfig
from nemo_guide.core.advantages import equal_reward_groups, group_advantages
from nemo_guide.core.guidance import assemble_groups, select_for_guidance
from nemo_guide.core.loss import guide_policy_loss
from nemo_guide.core.mismatch import RolloutCorrection, truncated_importance_weights
from nemo_guide.on_policy import mini_batches, trained_index
from nemo_guide.prompts import Prompt
from nemo_guide.rewards import CORRECT_ABOVE, RewardFn
from nemo_guide.tracking import reduce_metrics


def step_seed(seed: int, step: int, phase: int) -> int:
    """Seed of one sampling call; depends only on (seed, step, phase), so a resumed run samples the same."""
    return (seed * 1_000_003 + step) * 8 + phase


class StepTimer:
    """Seconds spent per named section of one step: ``with timer("generation"): ...``."""

    def __init__(self, *names: str) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# -- steps 2-3 and 5-6 ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rollouts:
    """``G`` rollouts for each of ``B`` prompts, prompt-major (rollout ``j`` of prompt ``b`` at ``b*G + j``)."""

    plain_prompt_ids: list[list[int]]
    """Shape: ``[B*G]`` token lists: the prompt without hint."""
    sample_prompt_ids: list[list[int]]
    """Shape: ``[B*G]``: the prompt sampled with (the hinted one for guided rollouts)."""
    responses: list[list[int]]
    finished: list[bool]
    texts: list[str]
    rewards: torch.Tensor
    """Shape: ``[B*G]``, float32."""
    sample_logprobs: list[list[float]] | None = None
    """Shape: ``[B*G]`` lists: the sampler's log-prob of each response token (when asked for)."""

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def correct(self) -> torch.Tensor:
        """Shape: ``[B*G]``, bool: the verifier's verdict (reward above ``CORRECT_ABOVE``)."""
        return self.rewards > CORRECT_ABOVE


def sample_and_score(
    generator: Generator | LogprobGenerator,
    tokenizer: PromptTokenizer,
    reward_fn: RewardFn,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    *,
    group_size: int,
    generation: GenerationConfig,
    seed: int,
    plain: Sequence[Prompt] | None = None,
    timer: StepTimer | None = None,
    with_logprobs: bool = False,
) -> Rollouts:
    """Sample ``group_size`` responses per prompt from the current policy and verify them.

    Args:
        prompts: the ``B`` prompts to sample behind (plain, or hinted for guided rollouts).
        answers: their gold answers.
        plain: the same records' plain prompts when ``prompts`` are hinted (None: ``prompts``).
        timer: adds the ``generation`` and ``scoring`` seconds.
        with_logprobs: also keep the sampler's per-token log-probs (``generator`` must be a
            :class:`~nemo_guide.backends.base.LogprobGenerator`).
    """
    timer = timer or StepTimer()
    plain = prompts if plain is None else plain
    rep = lambda items: [x for x in items for _ in range(group_size)]  # noqa: E731  [B] -> [B*G]
    sample_ids = rep([p.ids for p in prompts])
    if not sample_ids:
        return Rollouts([], [], [], [], [], torch.zeros(0), [] if with_logprobs else None)
    settings = dict(max_new_tokens=generation.max_new_tokens, temperature=generation.temperature, top_p=generation.top_p, seed=seed)
    sample_logprobs = None
    with timer("generation"):
        if with_logprobs:
            responses, finished, sample_logprobs = generator.generate_with_logprobs(sample_ids, **settings)
        else:
            responses, finished = generator.generate(sample_ids, **settings)
    with timer("scoring"):
        texts = [tokenizer.decode(r) for r in responses]
        rewards = torch.tensor(reward_fn(rep([p.text for p in prompts]), texts, answers=rep(answers)), dtype=torch.float32)
    return Rollouts(rep([p.ids for p in plain]), sample_ids, responses, finished, texts, rewards, sample_logprobs)


# -- step 4 ------------------------------------------------------------------------------


def choose_guidance(plain: Rollouts, group_size: int, algo: AlgorithmConfig) -> torch.Tensor:
    """Prompts that get ``group_size`` hinted rollouts (``algorithm.guidance_threshold``).

    Returns:
        Shape: ``[B]``, bool; all False unless ``algo`` guides.
    """
    correct = plain.correct.view(-1, group_size)  # [B, G]
    if not algo.guided:
        return torch.zeros(correct.shape[0], dtype=torch.bool)
    return select_for_guidance(correct, algo.guidance_threshold)


# -- steps 7-8 ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Groups:
    """Per rollout of a step (plain rows first, then guided): its group and advantage. Each Shape: ``[N]``."""

    group: torch.Tensor
    guided: torch.Tensor
    train_mask: torch.Tensor
    """True where the rollout is trained on (False: replaced, or filtered by Filter-GRPO)."""
    rewards: torch.Tensor
    advantages: torch.Tensor
    filtered: torch.Tensor
    """True where Filter-GRPO dropped the rollout's group (all rewards equal)."""


def groups_and_advantages(plain_rewards: torch.Tensor, guided_rewards: torch.Tensor, guide: torch.Tensor, algo: AlgorithmConfig) -> Groups:
    """Groups S(q) (union or replace), group-normalised advantages, and Filter-GRPO's drop.

    Args:
        plain_rewards: Shape: ``[B*G]``.
        guided_rewards: Shape: ``[M*G]``, the guided prompts' rollouts in prompt order.
        guide: Shape: ``[B]``, bool, from :func:`choose_guidance` (``M`` True).
    """
    group, guided, train_mask = assemble_groups(guide, algo.group_size, algo.guided_group)  # [N] each
    rewards = torch.cat([plain_rewards, guided_rewards])  # [N]
    advantages = group_advantages(rewards, group, normalize_std=algo.normalize_std)
    filtered = torch.zeros_like(train_mask)
    if algo.mode == "filter_grpo":  # groups whose rewards are all equal carry no signal
        filtered = equal_reward_groups(rewards, group) & train_mask
        train_mask = train_mask & ~filtered
    return Groups(group, guided, train_mask, rewards, advantages, filtered)


# -- the dual-context batch ----------------------------------------------------------------


def build_batch(
    plain_prompts: list[list[int]],
    sample_prompts: list[list[int]],
    responses: list[list[int]],
    rewards: torch.Tensor,
    group: torch.Tensor,
    guided: torch.Tensor,
    train_mask: torch.Tensor,
) -> RolloutBatch:
    """A :class:`RolloutBatch` with ``loss_mask[i, t]`` = token ``t`` exists and rollout ``i`` is trained."""
    width = max((len(r) for r in responses), default=0)
    lengths = torch.tensor([len(r) for r in responses])
    loss_mask = (torch.arange(width)[None, :] < lengths[:, None]) & train_mask[:, None]  # [N, L]
    return RolloutBatch(plain_prompts, sample_prompts, responses, guided, group, rewards, loss_mask)


def dual_context_batch(plain: Rollouts, guided: Rollouts, groups: Groups) -> RolloutBatch:
    """Plain then guided rollouts, each with its plain and its sampling prompt, and their advantages."""
    batch = build_batch(
        plain.plain_prompt_ids + guided.plain_prompt_ids,
        plain.sample_prompt_ids + guided.sample_prompt_ids,
        plain.responses + guided.responses,
        groups.rewards,
        groups.group,
        groups.guided,
        groups.train_mask,
    )
    batch = batch.with_(advantages=groups.advantages)
    if plain.sample_logprobs is not None and guided.sample_logprobs is not None:
        sampled = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)  # [N, L]
        for i, lp in enumerate(plain.sample_logprobs + guided.sample_logprobs):
            sampled[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        batch = batch.with_(sample_logprobs=sampled)
    return batch


def sft_batch(tokenizer: PromptTokenizer, prompts: Sequence[Prompt], solutions: Sequence[str]) -> RolloutBatch:
    """The reference solutions (plus EOS) as responses to their plain prompts: the SFT baseline's batch."""
    responses = [tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_ids[0]] for s in solutions]
    ids = [p.ids for p in prompts]
    n = len(responses)
    return build_batch(ids, ids, responses, torch.zeros(n), torch.arange(n), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))


def trained_rows(batch: RolloutBatch) -> RolloutBatch:
    """The rollouts with at least one token in the loss."""
    return batch.select(trained_index(batch))


# -- step 9 ------------------------------------------------------------------------------


def with_old_logprobs(policy: Policy, batch: RolloutBatch, algo: AlgorithmConfig, *, current: torch.Tensor | None = None) -> tuple[RolloutBatch, torch.Tensor]:
    """pi_old on the prompt each rollout was sampled with (``old_logprob_context=sampling``,
    the paper) or on the plain prompt, before any update; pi_ref on the plain prompt when
    the KL term is on.

    Args:
        current: Shape: ``[N]``, bool (:func:`nemo_guide.on_policy.old_from_current_rows`): rows
            left out of this forward, flagged ``old_from_current`` (NaN in ``old_logprobs`` and in
            the entropy until :func:`nemo_guide.on_policy.with_current_entropy`). None: all scored.

    Returns:
        ``(batch with old_logprobs (and ref_logprobs), entropy [N, L] of pi_old)``.
    """
    context = "sample" if algo.old_logprob_context == "sampling" else "plain"
    if current is None or not bool(current.any()):
        old, entropy = policy.logprobs(batch, context, with_entropy=True)
        batch = batch.with_(old_logprobs=old)
    else:
        old = torch.full(batch.loss_mask.shape, float("nan"))  # [N, L]
        entropy = torch.full(batch.loss_mask.shape, float("nan"))
        scored = torch.nonzero(~current).squeeze(-1)
        if len(scored):
            old[scored], entropy[scored] = policy.logprobs(batch.select(scored), context, with_entropy=True)
        batch = batch.with_(old_logprobs=old, old_from_current=current.clone())
    if algo.kl_coef > 0:
        batch = batch.with_(ref_logprobs=policy.logprobs(batch, "plain", reference=True)[0])
    return batch, entropy


def with_rollout_correction(policy: Policy, batch: RolloutBatch, algo: AlgorithmConfig) -> tuple[RolloutBatch, dict[str, float]]:
    """Step 9b, ``algorithm.rollout_correction=tis`` only: truncated importance weights
    ``min(pi_old / pi_sampler, tis_cap)`` against the sampler's reported log-probs, with
    pi_old behind the prompt each rollout was sampled with (the hinted one for guided
    rollouts: the engine sampled behind the hint). Returns the batch with ``is_weights``
    and the ``rollout/*`` metrics; unchanged and no metrics when the correction is off."""
    if RolloutCorrection(algo.rollout_correction) is RolloutCorrection.NONE or not len(batch):
        return batch, {}
    if batch.sample_logprobs is None:
        raise RuntimeError("rollout_correction=tis needs the sampler's log-probs: sample with with_logprobs=True")
    trainer = batch.old_logprobs if algo.old_logprob_context == "sampling" else policy.logprobs(batch, "sample")[0]
    weights, metrics = truncated_importance_weights(trainer, batch.sample_logprobs, batch.loss_mask, batch.guided, cap=algo.tis_cap)
    return batch.with_(is_weights=weights), {k: float(v) for k, v in metrics.items()}


# -- step 10 -----------------------------------------------------------------------------


def micro_share(micro: RolloutBatch, totals: Totals, aggregation: str) -> float:
    """The fraction of the mini-batch's loss that ``micro`` carries, so summed micro-batch
    gradients equal the mini-batch loss's: tokens for ``token-mean``, counted rollouts for the
    ``seq-mean-*`` aggregations, 1 for ``paper`` (already normalised by B*G). ``totals`` are
    the whole mini-batch's (:meth:`Totals.of`, or summed over data-parallel ranks)."""
    if aggregation == "paper":
        return 1.0
    own = Totals.of(micro)
    if aggregation == "token-mean":
        return own.tokens / max(1.0, totals.tokens)
    return own.rows / max(1.0, totals.rows)


def policy_loss_fn(algo: AlgorithmConfig, num_prompts: int) -> LossFn:
    """The Guide-GRPO surrogate of ``nemo_guide.core.loss`` as a policy loss callback."""

    def loss_fn(micro: RolloutBatch, logprobs: torch.Tensor, entropy: torch.Tensor | None, totals: Totals):
        loss, metrics = guide_policy_loss(
            logprobs,
            micro.old_logprobs,  # pi_theta's own, detached, on old_from_current rows (Policy.train_step)
            micro.advantages,
            micro.loss_mask,
            micro.guided,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            clip_guided=algo.clip_guided,
            shaping=algo.shaping,
            shaping_gamma=algo.shaping_gamma,
            shaping_scope=algo.shaping_scope,
            aggregation=algo.aggregation,
            num_prompts=num_prompts,
            group_size=algo.group_size,
            ref_logprobs=micro.ref_logprobs,
            kl_coef=algo.kl_coef,
            kl_estimator=algo.kl_estimator,
            entropy=entropy if algo.entropy_coef != 0 else None,  # scored for pi_old's entropy only: not a loss term
            entropy_coef=algo.entropy_coef,
            is_weights=micro.is_weights,
        )
        return loss * micro_share(micro, totals, algo.aggregation), metrics

    return loss_fn


def sft_loss_fn(micro: RolloutBatch, logprobs: torch.Tensor, entropy: torch.Tensor | None, totals: Totals):
    """Token-mean negative log-likelihood of the reference solutions (the SFT baseline)."""
    mask = micro.loss_mask
    nll = -(logprobs * mask).sum() / max(1.0, totals.tokens)
    return nll, {"loss/sft_nll": (-(logprobs * mask).sum() / mask.sum().clamp(min=1)).detach()}


def update(
    policy: Policy,
    batch: RolloutBatch,
    loss_fn: LossFn,
    *,
    epochs: int,
    mini_batch_size: int | None,
    micro_batch_size: int,
    with_entropy: bool,
    seed: int,
) -> list[dict[str, float]]:
    """``epochs`` passes over ``batch`` in shuffled mini-batches (None: the whole batch), one
    optimizer step each; returns each step's metrics (empty for an empty batch)."""
    out = []
    for mini in mini_batches(len(batch), epochs=epochs, mini_batch_size=mini_batch_size, seed=seed):
        metrics = policy.train_step(batch.select(mini), loss_fn, micro_batch_size=micro_batch_size, with_entropy=with_entropy)
        metrics.pop(TRAIN_ENTROPY, None)
        out.append(metrics)
    return out


# -- step 11 -----------------------------------------------------------------------------


def step_metrics(
    plain: Rollouts,
    guided: Rollouts,
    guide: torch.Tensor,
    groups: Groups,
    entropy: torch.Tensor,
    trained: int,
    updates: list[dict[str, float]],
    timer: StepTimer,
) -> dict[str, float]:
    """The metrics of one step (README, "Metrics"); ``entropy`` is pi_old's, Shape ``[N, L]``."""
    lengths = torch.tensor([len(r) for r in plain.responses], dtype=torch.float32)  # [B*G]
    tokens = torch.arange(entropy.shape[1])[None, :] < lengths[:, None]  # [B*G, L]
    finished = plain.finished + guided.finished
    gen_tokens = sum(len(r) for r in plain.responses) + sum(len(r) for r in guided.responses)
    metrics: dict[str, float] = {
        "train/reward": float(plain.rewards.mean()),
        "train/reward_guided": float(guided.rewards.mean()) if len(guided) else float("nan"),
        "train/guided_frac": float(guide.float().mean()),
        "train/pass_at_k": float(plain.correct.view(guide.shape[0], -1).any(-1).float().mean()),
        "train/response_length": float(lengths.mean()),
        "train/response_length_guided": float(torch.tensor([len(r) for r in guided.responses], dtype=torch.float32).mean()) if len(guided) else float("nan"),
        "train/truncated_frac": 1.0 - sum(finished) / max(1, len(finished)),
        "train/entropy": float((entropy[: len(plain)] * tokens).sum() / tokens.sum().clamp(min=1)),
        "train/rollouts": float(len(groups.rewards)),
        "train/trained_rollouts": float(trained),
        "train/filtered_frac": float(groups.filtered.float().mean()),
        "perf/tokens_per_s": gen_tokens / max(1e-9, timer.seconds["generation"]),
        **{f"time/{key}": v for key, v in timer.seconds.items()},
    }
    # Several optimizer steps (mini-batches, epochs): means, min/max, and the count of skipped ones.
    metrics.update(reduce_metrics(updates, sums=("optim/skipped",)) if updates else {"optim/skipped": 0.0})
    metrics["optim/updates"] = float(len(updates))
    return metrics
