"""Algorithm 1 of the paper (Guide-GRPO), the embedded host: one process, one :class:`PolicyBackend`.

:func:`algorithm_step` is one step, composed of the named steps of :mod:`nemo_guide.steps`
that every host calls (the NeMo-Aligner trainer calls the same ones):

1. sample a batch of ``B`` prompts (:func:`train`);
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
   once, before any update (and, with ``algorithm.rollout_correction=tis``, truncated
   importance weights against the sampler's own log-probs); when the update is on-policy
   (one epoch of one mini-batch), rollouts whose sampling prompt is the plain one take
   them from step 10's forward instead, detached (``algorithm.old_logprobs=reuse``);
10. ``mu`` epochs of updates with :func:`guide_policy_loss`, new log-probs on the plain
    prompt, so guided rollouts are trained as if sampled without the hint;
11. log, evaluate, checkpoint (:func:`train`).

``mode=grpo`` never guides; ``mode=sft`` replaces step 10's batch by the records' reference
solutions (the paper's SFT baseline; rollouts are still sampled and scored so the curves
compare).

Deviations from the paper, all configurable: the loss aggregation defaults to
``token-mean`` (verl, which the authors ran) rather than Eq. 6's per-rollout means
(``aggregation=paper``); old log-probs are recomputed by the training backend instead of
taken from the sampler (they agree up to numerics, and the recomputation is what makes
the ratio exactly 1 on the first update).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, closing
from functools import partial
from pathlib import Path
from typing import Any, Callable

from nemo_guide.backends.base import LossFn, PolicyBackend
from nemo_guide.checkpoint import atomic_write_text, latest_checkpoint, read_checkpoint, write_checkpoint
from nemo_guide.config import Config
from nemo_guide.data.sources import default_reward, load_split, resolve_eval
from nemo_guide.errors import RunError
from nemo_guide.evaluation import heldout_pass1
from nemo_guide.on_policy import old_from_current_rows, update_on_policy, with_current_entropy
from nemo_guide.prompts import PromptSampler, PromptSet, PromptSettings, encode_prompts, require_usable
from nemo_guide.rewards import RewardFn, make_reward
from nemo_guide.rundir import Interrupted, interrupts_as_errors, plan_run, run_directory
from nemo_guide.steps import (
    StepTimer,
    choose_guidance,
    dual_context_batch,
    groups_and_advantages,
    policy_loss_fn,
    sample_and_score,
    sft_batch,
    sft_loss_fn,
    step_metrics,
    step_seed,
    trained_rows,
    update,
    with_old_logprobs,
    with_rollout_correction,
)
from nemo_guide.tracking import MetricsLogger, StepReport, plot_training, read_metrics

MAX_CONSECUTIVE_SKIPS = 3
SUMMARY_FILE = "summary.json"
TIMING_KEYS = ("time/generation", "time/scoring", "time/logprobs", "time/update", "time/step")
EVAL_PHASE = 7
"""``step_seed`` phase of held-out evaluation (0, 1, 2: plain rollouts, guided rollouts, shuffling)."""


def algorithm_step(cfg: Config, backend: PolicyBackend, reward_fn: RewardFn, loss_fn: LossFn, prompts: PromptSet, idx: list[int], step: int) -> dict[str, float]:
    """Steps 2-10 of Algorithm 1 on the prompts ``idx`` of ``prompts``; returns the step's metrics."""
    algo, k, seed = cfg.algorithm, cfg.algorithm.group_size, cfg.run.seed
    timer = StepTimer("generation", "scoring", "logprobs", "update")
    records = [prompts.records[i] for i in idx]
    with_logprobs = algo.rollout_correction != "none"  # the sampler's own log-probs, for the correction

    # 2-3. k rollouts per prompt from pi_old on the plain prompt, verified.
    plain = sample_and_score(
        backend, backend, reward_fn, [prompts.plain[i] for i in idx], [r.answer for r in records],
        group_size=k, generation=cfg.generation, seed=step_seed(seed, step, 0), timer=timer, with_logprobs=with_logprobs,
    )
    # 4. Prompts for guidance.
    guide = choose_guidance(plain, k, algo)  # [B]
    chosen = [i for i, g in zip(idx, guide.tolist(), strict=True) if g]
    # 5-6. k rollouts per chosen prompt from the same pi_old on the hinted prompt, verified.
    guided = sample_and_score(
        backend, backend, reward_fn, [prompts.hinted[i] for i in chosen], [prompts.records[i].answer for i in chosen],
        plain=[prompts.plain[i] for i in chosen], group_size=k, generation=cfg.generation, seed=step_seed(seed, step, 1), timer=timer,
        with_logprobs=with_logprobs,
    )
    # 7-8. Groups S(q) and their advantages; Filter-GRPO drops groups without signal.
    groups = groups_and_advantages(plain.rewards, guided.rewards, guide, algo)
    batch = dual_context_batch(plain, guided, groups)
    # 9. Old log-probs behind the prompt each rollout was sampled with, before any update
    #    (on-policy, rows sampled behind the plain prompt take them from step 10's forward).
    with timer("logprobs"):
        current = old_from_current_rows(batch, algo, cfg.optim.mini_batch_size)  # [N]
        batch, entropy = with_old_logprobs(backend, batch, algo, current=current)
        batch, correction = with_rollout_correction(backend, batch, algo)
    # 10. mu epochs of updates scored on the plain prompt (SFT: on the reference solutions).
    with timer("update"):
        trained = sft_batch(backend, [prompts.plain[i] for i in idx], [r.solution for r in records]) if algo.mode == "sft" else trained_rows(batch)
        micro, shuffle = cfg.optim.micro_batch_size, step_seed(seed, step, 2)
        if batch.old_from_current is not None:  # on-policy: one update, whose forward also gives pi_old's entropy
            updates, trained_entropy = update_on_policy(backend, trained, loss_fn, micro_batch_size=micro, seed=shuffle)
            entropy = with_current_entropy(entropy, batch, trained_entropy)
        else:
            updates = update(
                backend, trained, loss_fn, epochs=algo.ppo_epochs, mini_batch_size=cfg.optim.mini_batch_size,
                micro_batch_size=micro, with_entropy=algo.entropy_coef > 0, seed=shuffle,
            )
    return {**step_metrics(plain, guided, guide, groups, entropy, len(trained), updates, timer), **correction}


def train(
    cfg: Config,
    backend: PolicyBackend,
    *,
    reward_fn: RewardFn | None = None,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary also written to ``summary.json``.

    ``reward_fn`` defaults to the configured verifier (closed at the end); ``loss_fn`` to the
    Guide-GRPO surrogate (or the SFT loss in ``mode=sft``). Both are injectable for other tasks and tests.
    Nothing is written before every check has passed (run directory, config, data); the run
    directory is locked while the run lasts (:mod:`nemo_guide.rundir`). Ctrl-C closes the
    logger and the reward workers, then raises :class:`Interrupted`, which says how to continue.
    """
    algo, run = cfg.algorithm, cfg.run
    log = log or print
    started = time.perf_counter()
    with interrupts_as_errors(run.run_dir), ExitStack() as stack:
        plan_run(cfg)  # in use? a run to continue or to refuse? written by another config?
        train_prompts, eval_prompts = load_prompts(cfg, backend)
        run_dir, ckpt = run.run_dir, stack.enter_context(run_directory(cfg, log)).checkpoint
        if reward_fn is None:
            reward_fn = stack.enter_context(closing(make_reward(reward_name(cfg), num_workers=cfg.data.reward_workers)))
        loss_fn = loss_fn or (sft_loss_fn if algo.mode == "sft" else policy_loss_fn(algo, cfg.data.prompt_batch_size))
        if algo.kl_coef > 0:
            backend.snapshot_reference()
        state = _start_or_resume(backend, ckpt, log)
        sampler = PromptSampler(len(train_prompts.records), run.seed, **state["sampler"])
        history: dict[str, Any] = state["history"]
        logger = stack.enter_context(MetricsLogger(run_dir, resume_step=state["step"] if ckpt is not None else None))
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        evaluate = partial(_evaluate, cfg, backend, reward_fn, eval_prompts)
        if ckpt is None:
            log(f"policy: {backend.describe()}")
            history["eval_before"] = before = evaluate(0)
            if before:
                logger.log(0, before)
                log("eval before training: " + ", ".join(f"{key[5:]} {v:.3f}" for key, v in before.items() if key.startswith("eval/pass1")))
        report = stack.enter_context(StepReport(run.name, run.steps, state["step"], progress=progress, log=log))
        consecutive_skips = 0
        for step in range(state["step"] + 1, run.steps + 1):
            t_step = time.perf_counter()
            idx = sampler.next(cfg.data.prompt_batch_size)  # 1. a batch of B prompts
            metrics = algorithm_step(cfg, backend, reward_fn, loss_fn, train_prompts, idx, step)
            metrics["train/epoch"] = float(sampler.epoch)
            consecutive_skips = _count_skips(metrics, state, consecutive_skips, step, cfg, run_dir, report.write)
            # 11. Log, evaluate, checkpoint.
            history.setdefault("train_reward_first", metrics["train/reward"])
            history["train_reward_last"] = metrics["train/reward"]
            if run.eval_every and step % run.eval_every == 0 and step < run.steps:
                metrics.update(evaluate(step))
            if step == run.steps:
                history["eval_after"] = after = evaluate(step)
                metrics.update(after)
            metrics["time/step"] = time.perf_counter() - t_step
            if step % run.log_every == 0 or step == run.steps:
                logger.log(step, metrics)
            report.step(step, metrics)
            if (run.save_every and step % run.save_every == 0) or step == run.steps:
                state.update(step=step, sampler=sampler.state(), history=history, wall_seconds=state["wall_seconds"] + time.perf_counter() - started)
                started = time.perf_counter()
                write_checkpoint(run_dir, step, save_backend=backend.save, state=state, config=cfg.to_dict(), keep=run.keep_checkpoints)
        return _finish(cfg, run_dir, state, time.perf_counter() - started, log)


def _evaluate(cfg: Config, backend: PolicyBackend, reward_fn: RewardFn, eval_prompts: PromptSet | None, step: int) -> dict[str, float]:
    """Held-out greedy pass@1 at ``step`` (none without held-out prompts), with its time."""
    if eval_prompts is None:
        return {}
    t = time.perf_counter()
    gen = cfg.generation
    out = heldout_pass1(backend, backend, reward_fn, eval_prompts, max_new_tokens=gen.max_new_tokens, temperature=gen.eval_temperature, top_p=gen.top_p, seed=step_seed(cfg.run.seed, step, EVAL_PHASE))
    return {**out, "time/eval": time.perf_counter() - t}


# -- set-up --------------------------------------------------------------------------------


def reward_name(cfg: Config) -> str:
    """``data.reward``, with ``auto`` resolved from the training data (exact for built-in tasks, else math)."""
    return default_reward(cfg.data.train) if cfg.data.reward == "auto" else cfg.data.reward


def load_prompts(cfg: Config, backend: PolicyBackend) -> tuple[PromptSet, PromptSet | None]:
    """The training prompts (every one usable, else :class:`RunError`) and the held-out ones, if any."""
    algo, settings = cfg.algorithm, PromptSettings.from_config(cfg)
    train = encode_prompts(load_split(cfg.data.train, "train"), backend, settings, hinted=algo.guided, source=cfg.data.train)
    require_usable(train, cfg.data.train, need_hints=algo.guided, need_solutions=algo.mode == "sft")
    source = resolve_eval(cfg.data.train, cfg.data.eval)
    if source is None:
        return train, None
    return train, encode_prompts(load_split(source, "eval")[: cfg.data.eval_limit], backend, settings, hinted=False, source=source)


def _start_or_resume(backend: PolicyBackend, ckpt: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    """The run state: fresh, or the checkpoint's (its config was checked by :func:`plan_run`)."""
    if ckpt is None:
        return {"step": 0, "sampler": {"epoch": 0, "position": 0}, "skipped_updates": 0, "history": {}, "wall_seconds": 0.0}
    state, _ = read_checkpoint(ckpt)
    backend.load(ckpt)
    log(f"resumed from {ckpt} (step {state['step']})")
    return state


def _count_skips(metrics: dict[str, float], state: dict[str, Any], consecutive: int, step: int, cfg: Config, run_dir: Path, say: Callable[[str], None]) -> int:
    """Count skipped (non-finite) updates; stop the run after ``MAX_CONSECUTIVE_SKIPS`` steps of nothing else."""
    skipped, updates = int(metrics["optim/skipped"]), int(metrics["optim/updates"])
    state["skipped_updates"] += skipped
    consecutive = consecutive + 1 if updates and skipped == updates else 0
    if skipped:
        say(f"step {step}: {skipped} update(s) skipped: non-finite loss or gradient (total {state['skipped_updates']})")
    if consecutive >= MAX_CONSECUTIVE_SKIPS:
        raise RunError(
            f"step {step}: every update of the last {consecutive} steps had a non-finite loss or gradient; "
            f"the weights are unchanged since. Lower optim.lr (now {cfg.optim.lr}) or set optim.grad_clip, and resume from {latest_checkpoint(run_dir)}"
        )
    return consecutive


def _finish(cfg: Config, run_dir: Path, state: dict[str, Any], tail_seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    history = state["history"]
    rows = [r for r in read_metrics(run_dir) if "train/reward" in r]
    mean_times = {key[5:]: sum(r[key] for r in rows) / len(rows) for key in TIMING_KEYS} if rows else {}
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
    log(f"plot: {plot_training(run_dir, title=f'{cfg.run.name}: {cfg.algorithm.mode}')}")
    log(f"summary: {run_dir / SUMMARY_FILE}")
    return summary


__all__ = ["Interrupted", "RunError", "algorithm_step", "load_prompts", "reward_name", "train"]
