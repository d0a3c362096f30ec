"""Algorithm 1 of the paper (Guide-GRPO), for any :class:`~nemo_guide.backends.base.PolicyBackend`.

One training step, top to bottom in :func:`train`:

1. sample a batch of ``B`` prompts;
2. sample ``k`` rollouts per prompt from pi_old (the current weights) on the plain prompt;
3. verify them;
4. select prompts for guidance (``algorithm.guidance_threshold``; all-incorrect by default);
5. sample ``k`` guided rollouts for each selected prompt, from the same pi_old, on the
   prompt with its hint;
6. verify them;
7. group advantages over S(q): the union of a guided prompt's plain and guided rollouts
   (``guided_group=union``, the paper) or its guided rollouts alone (``replace``, guide_rl);
8. Filter-GRPO only: drop groups whose rewards are all equal;
9. old log-probs log pi_old(o_t | sampling prompt) (the hinted prompt for guided rollouts),
   once, before any update;
10. ``mu`` epochs of updates with :func:`guide_policy_loss`, new log-probs on the plain
    prompt, so guided rollouts are trained as if sampled without the hint;
11. log, evaluate, checkpoint.

``mode=grpo`` never guides; ``mode=sft`` replaces steps 4-10 by supervised learning on the
records' reference solutions (the paper's SFT baseline; rollouts are still sampled and
scored so the curves compare).

Deviations from the paper, all configurable: the loss aggregation defaults to
``token-mean`` (verl, which the authors ran) rather than Eq. 6's per-rollout means
(``aggregation=paper``); old log-probs are recomputed by the training backend instead of
taken from the sampler (they agree up to numerics, and the recomputation is what makes
the ratio exactly 1 on the first update).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nemo_guide.backends.base import LossFn, PolicyBackend, RolloutBatch
from nemo_guide.checkpoint import (
    atomic_write_text,
    config_differences,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from nemo_guide.config import AlgorithmConfig, Config
from nemo_guide.core.advantages import equal_reward_groups, group_advantages
from nemo_guide.core.guidance import assemble_groups, select_for_guidance
from nemo_guide.core.loss import guide_policy_loss
from nemo_guide.data.records import Record
from nemo_guide.data.sources import default_reward, load_split, resolve_eval
from nemo_guide.data.templates import PromptStyle, build_prompt
from nemo_guide.rewards import make_reward
from nemo_guide.tracking import MetricsLogger, plot_training, reduce_metrics

MAX_CONSECUTIVE_SKIPS = 3
SUMMARY_FILE = "summary.json"


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# -- prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """Tokenised prompts of a dataset: plain, and hinted where a record has a hint."""

    records: list[Record]
    plain_text: list[str]
    plain: list[list[int]]
    hinted_text: list[str | None]
    hinted: list[list[int] | None]


def prepare_prompts(records: Sequence[Record], backend: PolicyBackend, cfg: Config, source: str, *, need_hints: bool, need_solutions: bool = False) -> Prompts:
    """Template and tokenise every prompt once; report every unusable record at once.

    Raises:
        RunError: records without a hint while guidance is on, without a solution in SFT
            mode, or whose prompt is empty or longer than ``data.max_prompt_tokens``.
    """
    d = cfg.data
    tokenizer = getattr(getattr(backend, "adapter", None), "tokenizer", None)
    add_special = d.prompt_style != PromptStyle.CHAT.value
    problems: list[str] = []
    plain_text, plain, hinted_text, hinted = [], [], [], []
    limit = min(d.max_prompt_tokens, getattr(backend, "max_length", d.max_prompt_tokens))
    for r in records:
        if need_hints and r.hint is None:
            problems.append(f"record {r.id!r} has no hint, but algorithm.mode=guide_grpo guides failed prompts")
        if need_solutions and r.solution is None:
            problems.append(f"record {r.id!r} has no solution, but algorithm.mode=sft trains on reference solutions")
        text = build_prompt(r.problem, d.prompt_style, tokenizer=tokenizer, system_prompt=d.system_prompt)
        ids = backend.encode(text, add_special_tokens=add_special)
        h_text = h_ids = None
        if r.hint is not None:
            h_text = build_prompt(r.problem, d.prompt_style, hint=r.hint, hint_template=d.hint_template, tokenizer=tokenizer, system_prompt=d.system_prompt)
            h_ids = backend.encode(h_text, add_special_tokens=add_special)
        for kind, seq in (("prompt", ids), ("hinted prompt", h_ids)):
            if seq is None:
                continue
            if not seq:
                problems.append(f"record {r.id!r}: the {kind} is empty after templating and tokenisation")
            elif len(seq) > limit:
                problems.append(
                    f"record {r.id!r}: the {kind} has {len(seq)} tokens, more than {limit} "
                    f"(data.max_prompt_tokens or the model's context); shorten it or raise data.max_prompt_tokens"
                )
        plain_text.append(text)
        plain.append(ids)
        hinted_text.append(h_text)
        hinted.append(h_ids)
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        fix = ""
        if any("no hint" in p for p in problems):
            fix = "\nfix: add hints (`nemo-guide hints`), or train with algorithm.mode=grpo or algorithm.guidance_threshold=never"
        raise RunError(f"{source}: {len(problems)} unusable record(s):\n  " + "\n  ".join(shown) + more + fix)
    return Prompts(list(records), plain_text, plain, hinted_text, hinted)


class PromptSampler:
    """Seeded epochs over a dataset: each epoch is a fresh permutation; the position is saved."""

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.size - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def step_seed(seed: int, step: int, phase: int) -> int:
    """Seed of one sampling call; depends only on (seed, step, phase), so a resumed run samples the same."""
    return (seed * 1_000_003 + step) * 8 + phase


# -- batches and losses -------------------------------------------------------------------------


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


def micro_share(micro: RolloutBatch, mini: RolloutBatch, aggregation: str) -> float:
    """The fraction of ``mini``'s loss that ``micro`` carries, so summed micro-batch gradients
    equal the mini-batch loss's: tokens for ``token-mean``, counted rollouts for the
    ``seq-mean-*`` aggregations, 1 for ``paper`` (already normalised by B*G)."""
    if aggregation == "paper":
        return 1.0
    if aggregation == "token-mean":
        return float(micro.loss_mask.sum()) / max(1.0, float(mini.loss_mask.sum()))
    return float(micro.loss_mask.any(-1).sum()) / max(1.0, float(mini.loss_mask.any(-1).sum()))


def policy_loss_fn(algo: AlgorithmConfig, num_prompts: int) -> LossFn:
    """The Guide-GRPO surrogate of ``nemo_guide.core.loss`` as a backend loss callback."""

    def loss_fn(micro: RolloutBatch, logprobs: torch.Tensor, entropy: torch.Tensor | None, mini: RolloutBatch):
        loss, metrics = guide_policy_loss(
            logprobs,
            micro.old_logprobs,
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
            entropy=entropy,
            entropy_coef=algo.entropy_coef,
        )
        return loss * micro_share(micro, mini, algo.aggregation), metrics

    return loss_fn


def sft_loss_fn(micro: RolloutBatch, logprobs: torch.Tensor, entropy: torch.Tensor | None, mini: RolloutBatch):
    """Token-mean negative log-likelihood of the reference solutions (the SFT baseline)."""
    mask = micro.loss_mask
    nll = -(logprobs * mask).sum() / max(1.0, float(mini.loss_mask.sum()))
    return nll, {"loss/sft_nll": (-(logprobs * mask).sum() / mask.sum().clamp(min=1)).detach()}


# -- evaluation ------------------------------------------------------------------------------


def evaluate(
    backend: PolicyBackend,
    prompts: Prompts,
    reward_fn: Callable,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Held-out pass@1 without hints (greedy when ``temperature == 0``), overall and per
    record ``kind`` (the built-in tasks' known / novel / unseen operators)."""
    correct: list[float] = []
    for start in range(0, len(prompts.plain), batch_size):
        chunk = slice(start, start + batch_size)
        responses, _ = backend.generate(prompts.plain[chunk], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + start)
        texts = [backend.decode(r) for r in responses]
        correct += reward_fn(prompts.plain_text[chunk], texts, answers=[r.answer for r in prompts.records[chunk]])
    out = {"eval/pass1": sum(correct) / max(1, len(correct)), "eval/problems": float(len(correct))}
    kinds: dict[str, list[float]] = {}
    for record, c in zip(prompts.records, correct):
        if "kind" in record.extra:
            kinds.setdefault(str(record.extra["kind"]), []).append(c)
    for kind, values in sorted(kinds.items()):
        out[f"eval/pass1_{kind}"] = sum(values) / len(values)
    return out


# -- the run -----------------------------------------------------------------------------------


def _prepare_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    run_dir = cfg.run.run_dir
    existing = list_checkpoints(run_dir)
    if cfg.run.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunError(f"run.resume=true but {run_dir} has no checkpoint; start without resume (or check run.name / run.output_dir)")
        return run_dir, ckpt
    if existing or (run_dir / "metrics.jsonl").exists():
        raise RunError(
            f"{run_dir} already holds a run ({len(existing)} checkpoint(s)); continue it with run.resume=true, "
            f"or pick another run.name, or delete the directory"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def train(cfg: Config, backend: PolicyBackend, *, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary also written to ``summary.json``."""
    algo, gen, run = cfg.algorithm, cfg.generation, cfg.run
    log = log or print
    started = time.perf_counter()
    run_dir, ckpt = _prepare_run_dir(cfg)
    k = algo.group_size
    sft = algo.mode == "sft"

    train_prompts = prepare_prompts(load_split(cfg.data.train, "train"), backend, cfg, cfg.data.train, need_hints=algo.guided, need_solutions=sft)
    eval_source = resolve_eval(cfg.data.train, cfg.data.eval)
    eval_prompts = None
    if eval_source is not None:
        eval_records = load_split(eval_source, "eval")[: cfg.data.eval_limit]
        eval_prompts = prepare_prompts(eval_records, backend, cfg, eval_source, need_hints=False)
    reward_fn = make_reward(default_reward(cfg.data.train) if cfg.data.reward == "auto" else cfg.data.reward)
    if algo.kl_coef > 0:
        backend.snapshot_reference()

    # Fresh start or resume.
    state: dict[str, Any] = {"step": 0, "sampler": {"epoch": 0, "position": 0}, "skipped_updates": 0, "history": {}, "wall_seconds": 0.0}
    if ckpt is not None:
        saved_state, saved_config = read_checkpoint(ckpt)
        diffs = config_differences(saved_config, cfg.to_dict())
        if diffs:
            raise RunError(f"{ckpt} was written by another config; differences:\n  " + "\n  ".join(diffs) + "\nfix: resume with the original config, or start a new run.name")
        backend.load(ckpt)
        state = saved_state
        log(f"resumed from {ckpt} (step {state['step']})")
    sampler = PromptSampler(len(train_prompts.records), run.seed, **state["sampler"])
    history: dict[str, Any] = state["history"]
    logger = MetricsLogger(run_dir, resume_step=state["step"] if ckpt is not None else None)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))

    def run_eval(step: int) -> dict[str, float]:
        if eval_prompts is None:
            return {}
        t = time.perf_counter()
        result = evaluate(backend, eval_prompts, reward_fn, max_new_tokens=gen.max_new_tokens, temperature=gen.eval_temperature, top_p=gen.top_p, seed=step_seed(run.seed, step, 7))
        result["time/eval"] = time.perf_counter() - t
        return result

    if ckpt is None:
        log(f"policy: {backend.describe() if hasattr(backend, 'describe') else type(backend).__name__}")
        before = run_eval(0)
        history["eval_before"] = before
        if before:
            logger.log(0, before)
            log("eval before training: " + ", ".join(f"{key[5:]} {v:.3f}" for key, v in before.items() if key.startswith("eval/pass1")))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.steps, initial=state["step"], desc=run.name, unit="step", dynamic_ncols=True)
    loss_fn = sft_loss_fn if sft else policy_loss_fn(algo, cfg.data.prompt_batch_size)
    consecutive_skips = 0
    step = state["step"]
    try:
        while step < run.steps:
            step += 1
            t_step = time.perf_counter()
            timings = {"generation": 0.0, "scoring": 0.0, "logprobs": 0.0, "update": 0.0}

            # 1. A batch of B prompts.
            idx = sampler.next(cfg.data.prompt_batch_size)
            records = [train_prompts.records[i] for i in idx]
            answers = [r.answer for r in records]
            B = len(idx)

            # 2. k rollouts per prompt from pi_old, plain prompts.
            t = time.perf_counter()
            plain_prompts = [train_prompts.plain[i] for i in idx for _ in range(k)]  # [B*k], prompt-major
            responses, finished = backend.generate(plain_prompts, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, seed=step_seed(run.seed, step, 0))
            timings["generation"] += time.perf_counter() - t

            # 3. Verify.
            t = time.perf_counter()
            texts = [backend.decode(r) for r in responses]
            rewards = torch.tensor(reward_fn([train_prompts.plain_text[i] for i in idx for _ in range(k)], texts, answers=[a for a in answers for _ in range(k)]), dtype=torch.float32)
            correct = (rewards > 0.5).view(B, k)  # [B, k]
            timings["scoring"] += time.perf_counter() - t

            # 4. Select prompts for guidance.
            guide = select_for_guidance(correct, algo.guidance_threshold) if algo.guided else torch.zeros(B, dtype=torch.bool)
            guided_idx = [i for i, g in zip(idx, guide.tolist()) if g]

            # 5. k guided rollouts per selected prompt, same pi_old, hinted prompts.
            g_prompts: list[list[int]] = [train_prompts.hinted[i] for i in guided_idx for _ in range(k)]  # [M*k]
            g_responses: list[list[int]] = []
            g_finished: list[bool] = []
            g_rewards = torch.zeros(0)
            if g_prompts:
                t = time.perf_counter()
                g_responses, g_finished = backend.generate(g_prompts, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, seed=step_seed(run.seed, step, 1))
                timings["generation"] += time.perf_counter() - t

                # 6. Verify.
                t = time.perf_counter()
                g_texts = [backend.decode(r) for r in g_responses]
                g_answers = [train_prompts.records[i].answer for i in guided_idx for _ in range(k)]
                g_rewards = torch.tensor(reward_fn([train_prompts.hinted_text[i] for i in guided_idx for _ in range(k)], g_texts, answers=g_answers), dtype=torch.float32)
                timings["scoring"] += time.perf_counter() - t

            # 7. Groups S(q) and group-normalised advantages.
            group, guided, train_mask = assemble_groups(guide, k, algo.guided_group)  # [N] each, plain rows first
            all_rewards = torch.cat([rewards, g_rewards])  # [N]
            advantages = group_advantages(all_rewards, group, normalize_std=algo.normalize_std)

            # 8. Filter-GRPO: groups whose rewards are all equal carry no signal; drop them.
            filtered = torch.zeros_like(train_mask)
            if algo.mode == "filter_grpo":
                filtered = equal_reward_groups(all_rewards, group) & train_mask
                train_mask = train_mask & ~filtered

            batch = build_batch(
                plain_prompts + [train_prompts.plain[i] for i in guided_idx for _ in range(k)],
                plain_prompts + g_prompts,
                responses + g_responses,
                all_rewards,
                group,
                guided,
                train_mask,
            ).with_(advantages=advantages)

            # 9. Old log-probs: pi_old on the prompt each rollout was sampled with (paper), before any update.
            t = time.perf_counter()
            old_context = "sample" if algo.old_logprob_context == "sampling" else "plain"
            old_logprobs, entropy = backend.logprobs(batch, old_context, with_entropy=True)
            batch = batch.with_(old_logprobs=old_logprobs)
            if algo.kl_coef > 0:
                batch = batch.with_(ref_logprobs=backend.logprobs(batch, "plain", reference=True)[0])
            timings["logprobs"] += time.perf_counter() - t

            # 10. mu epochs of updates on the plain context.
            t = time.perf_counter()
            if sft:
                train_batch = _sft_batch(records, train_prompts, idx, backend)
            else:
                train_batch = batch.select(torch.nonzero(batch.loss_mask.any(-1)).squeeze(-1))
            update_metrics: list[dict[str, float]] = []
            if len(train_batch):
                mini_size = cfg.optim.mini_batch_size or len(train_batch)
                shuffle = torch.Generator().manual_seed(step_seed(run.seed, step, 2))
                for _ in range(algo.ppo_epochs):
                    order = torch.randperm(len(train_batch), generator=shuffle)
                    for start in range(0, len(train_batch), mini_size):
                        mini = train_batch.select(order[start : start + mini_size])
                        update_metrics.append(backend.train_step(mini, loss_fn, micro_batch_size=cfg.optim.micro_batch_size, with_entropy=algo.entropy_coef > 0))
            timings["update"] += time.perf_counter() - t
            skipped = sum(m["optim/skipped"] for m in update_metrics)
            state["skipped_updates"] += int(skipped)
            consecutive_skips = consecutive_skips + 1 if update_metrics and skipped == len(update_metrics) else 0
            if skipped:
                _write(bar, log, f"step {step}: {int(skipped)} update(s) skipped: non-finite loss or gradient (total {state['skipped_updates']})")
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise RunError(
                    f"step {step}: every update of the last {consecutive_skips} steps had a non-finite loss or gradient; "
                    f"the weights are unchanged since. Lower optim.lr (now {cfg.optim.lr}) or set optim.grad_clip, and resume from {latest_checkpoint(run_dir)}"
                )

            # 11. Log, evaluate, checkpoint.
            gen_tokens = sum(len(r) for r in responses) + sum(len(r) for r in g_responses)
            plain_lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
            plain_tokens = torch.arange(batch.response_length)[None, :] < plain_lengths[:, None]  # [B*k, L]
            metrics: dict[str, float] = {
                "train/reward": float(rewards.mean()),
                "train/reward_guided": float(g_rewards.mean()) if len(g_rewards) else float("nan"),
                "train/guided_frac": float(guide.float().mean()),
                "train/pass_at_k": float(correct.any(-1).float().mean()),
                "train/response_length": float(plain_lengths.mean()),
                "train/response_length_guided": float(torch.tensor([len(r) for r in g_responses], dtype=torch.float32).mean()) if g_responses else float("nan"),
                "train/truncated_frac": 1.0 - sum(finished + g_finished) / max(1, len(finished) + len(g_finished)),
                "train/entropy": float((entropy[: B * k] * plain_tokens).sum() / plain_tokens.sum().clamp(min=1)),
                "train/rollouts": float(len(batch)),
                "train/trained_rollouts": float(len(train_batch)),
                "train/filtered_frac": float(filtered.float().mean()),
                "train/epoch": float(sampler.epoch),
                "perf/tokens_per_s": gen_tokens / max(1e-9, timings["generation"]),
                **{f"time/{key}": v for key, v in timings.items()},
            }
            # Several optimizer steps (mini-batches, epochs): means, min/max, and the count of skipped ones.
            metrics.update(reduce_metrics(update_metrics, sums=("optim/skipped",)) if update_metrics else {"optim/skipped": 0.0})
            metrics["optim/updates"] = float(len(update_metrics))
            history.setdefault("train_reward_first", metrics["train/reward"])
            history["train_reward_last"] = metrics["train/reward"]
            if run.eval_every and step % run.eval_every == 0 and step < run.steps:
                metrics.update(run_eval(step))
            if step == run.steps:
                after = run_eval(step)
                history["eval_after"] = after
                metrics.update(after)
            metrics["time/step"] = time.perf_counter() - t_step
            if step % run.log_every == 0 or step == run.steps:
                logger.log(step, metrics)
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['train/reward']:.2f}", guided=f"{metrics['train/guided_frac']:.2f}", refresh=False)
                bar.update(1)
            if (run.save_every and step % run.save_every == 0) or step == run.steps:
                state.update(step=step, sampler=sampler.state(), history=history, wall_seconds=state["wall_seconds"] + time.perf_counter() - started)
                started = time.perf_counter()
                write_checkpoint(run_dir, step, save_backend=backend.save, state=state, config=cfg.to_dict(), keep=run.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        close = getattr(reward_fn, "close", None)
        if close is not None:
            close()

    return _finish(cfg, run_dir, state, time.perf_counter() - started, log)


def _write(bar, log: Callable[[str], None], message: str) -> None:
    if bar is not None:
        bar.write(message)
    else:
        log(message)


def _sft_batch(records: list[Record], prompts: Prompts, idx: list[int], backend: PolicyBackend) -> RolloutBatch:
    """The prompts' reference solutions (plus EOS) as responses, for the SFT baseline."""
    responses = [backend.encode(r.solution, add_special_tokens=False) + [backend.eos_ids[0]] for r in records]
    plain = [prompts.plain[i] for i in idx]
    n = len(responses)
    return build_batch(plain, plain, responses, torch.zeros(n), torch.arange(n), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))


def _finish(cfg: Config, run_dir: Path, state: dict[str, Any], tail_seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    from nemo_guide.tracking import read_metrics

    history = state["history"]
    rows = [r for r in read_metrics(run_dir) if "train/reward" in r]
    timing_keys = ("time/generation", "time/scoring", "time/logprobs", "time/update", "time/step")
    mean_times = {key[5:]: sum(r[key] for r in rows) / len(rows) for key in timing_keys} if rows else {}
    summary = {
        "name": cfg.run.name,
        "mode": cfg.algorithm.mode,
        "steps": state["step"],
        "wall_seconds": round(state["wall_seconds"] + max(0.0, tail_seconds), 2),
        "train_reward_first": history.get("train_reward_first"),
        "train_reward_last": history.get("train_reward_last"),
        "train_reward_last10": sum(r["train/reward"] for r in rows[-10:]) / len(rows[-10:]) if rows else None,
        "eval_before": history.get("eval_before", {}).get("eval/pass1"),
        "eval_after": history.get("eval_after", {}).get("eval/pass1"),
        "eval_before_detail": history.get("eval_before"),
        "eval_after_detail": history.get("eval_after"),
        "skipped_updates": state["skipped_updates"],
        "mean_step_seconds": mean_times,
    }
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    try:
        plot = plot_training(run_dir, title=f"{cfg.run.name}: {cfg.algorithm.mode}")
        log(f"plot: {plot}")
    except ImportError:
        log("matplotlib is not installed; skipped the plot (pip install matplotlib)")
    log(f"summary: {run_dir / SUMMARY_FILE}")
    return summary


__all__ = ["Prompts", "PromptSampler", "RunError", "evaluate", "prepare_prompts", "train"]
