"""``GuideGRPOTrainer``: Algorithm 1 on NeMo-Aligner, modelled on Aligner's REINFORCE trainer.

One step (:meth:`GuideGRPOTrainer.fit`) is the embedded loop's: a batch of ``B`` prompts from
the seeded sampler (the same on every rank), then :func:`nemo_guide.loop.algorithm_step`
(steps 2-10 from the named steps of :mod:`nemo_guide.steps`) with the
:class:`~nemo_guide.aligner.host.AlignerHost` as generator, tokenizer and policy:

2-3. k plain rollouts per prompt through the actor's ``infer`` (each replica its share),
     verified in-process on each model-parallel source rank, gathered;
4.   prompts for guidance, decided on the global batch;
5-6. k hinted rollouts for them from the same engine state, verified, gathered;
7-8. groups S(q) and advantages on the global batch (Filter-GRPO's drop);
9.   old log-probs behind each rollout's sampling prompt (each replica its share, gathered);
10.  ``ppo_epochs`` x mini-batches of updates, each replica training its share of every
     mini-batch with the global token mean;
11.  validation (held-out greedy pass@1), logging, checkpoint.

With TensorRT-LLM, the engine probe (:mod:`nemo_guide.aligner.probe`) runs before anything
else (also on resume: the engine is new) and every ``model.ppo.trt_llm.probe_every`` steps,
and stops the run when the engine and the trainer disagree; each step logs the host's
generation throughput, padded engine rows and the engine's build and refit seconds.

Checkpoints are Aligner's (``ckpt_callback.custom_save``: weights and optimizer, NeMo's
distributed format) plus a side file with Guide's own state (data position, counters,
history), written atomically *before* the checkpoint: Aligner's resume reads only numbers in
the checkpoint's name, and a side file without its checkpoint is never read.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from nemo_guide.aligner.config import ProbeSettings
from nemo_guide.aligner.host import AlignerHost
from nemo_guide.aligner.preempt import Preempted, never
from nemo_guide.aligner.probe import check, run_probe
from nemo_guide.backends.base import LossFn
from nemo_guide.checkpoint import atomic_write_text
from nemo_guide.config import Config
from nemo_guide.errors import RunError
from nemo_guide.evaluation import heldout_pass1
from nemo_guide.loop import EVAL_PHASE, algorithm_step
from nemo_guide.prompts import PromptSampler, PromptSet
from nemo_guide.rewards import RewardFn
from nemo_guide.steps import step_seed
from nemo_guide.tracking import MetricsLogger

STATE_FILE = "guide_state-step={step}.json"
PROBE_PHASE = 8
"""``step_seed`` phase of the TensorRT-LLM probe's sampled pass (7 is held-out evaluation)."""
STEP_IN_NAME = re.compile(r"step=(\d+)")


def state_file(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / STATE_FILE.format(step=step)


def fresh_state() -> dict[str, Any]:
    return {"step": 0, "sampler": {"epoch": 0, "position": 0}, "history": {}, "optimizer_steps": 0}


def resume_state(ckpt_path: str | None, checkpoint_dir: Path) -> dict[str, Any]:
    """Guide's state for the checkpoint Aligner resumes from (``trainer.ckpt_path``), or a fresh one.

    Raises:
        RunError: the checkpoint has no side file (written by another trainer, or by hand).
    """
    if not ckpt_path:
        return fresh_state()
    found = STEP_IN_NAME.search(Path(ckpt_path).name)
    if found is None:
        raise RunError(f"cannot resume from {ckpt_path}: its name holds no 'step=N'; keep exp_manager.checkpoint_callback_params.filename with {{step}}")
    path = state_file(checkpoint_dir, int(found.group(1)))
    if not path.is_file():
        raise RunError(
            f"cannot resume exactly from {ckpt_path}: {path} is missing (the data position and counters are kept there). "
            "Restore the file, or start a new run from this checkpoint's weights with exp_manager.resume_if_exists=false"
        )
    return json.loads(path.read_text())


class GuideGRPOTrainer:
    """Runs ``config.run.steps`` Guide-GRPO steps on every rank; rank 0 writes metrics and side files."""

    def __init__(
        self,
        config: Config,
        host: AlignerHost,
        prompts: PromptSet,
        eval_prompts: PromptSet | None,
        reward_fn: RewardFn,
        loss_fn: LossFn,
        *,
        ckpt_callback: Any,
        checkpoint_dir: Path,
        run_dir: Path,
        state: dict[str, Any],
        nemo_logger: Any = None,
        log: Callable[[str], None] = print,
        stop_requested: Callable[[], bool] = never,
        probe: ProbeSettings | None = None,
    ) -> None:
        self.config, self.host, self.prompts, self.eval_prompts = config, host, prompts, eval_prompts
        self.reward_fn, self.loss_fn = reward_fn, loss_fn
        self.ckpt_callback, self.checkpoint_dir, self.run_dir = ckpt_callback, Path(checkpoint_dir), Path(run_dir)
        self.state, self.nemo_logger, self.probe = state, nemo_logger, probe
        self.rank0 = dist.get_rank() == 0
        self.log = log if self.rank0 else (lambda _msg: None)
        self.sampler = PromptSampler(len(prompts.records), config.run.seed, **state["sampler"])
        self.stop_requested, self.saved_step = stop_requested, None

    def fit(self) -> dict[str, Any]:
        cfg, run, state = self.config, self.config.run, self.state
        history = state["history"]
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.run_dir, resume_step=state["step"] if state["step"] else None, tensorboard=False) if self.rank0 else None
        try:
            probed = self.probe_engine(state["step"]) if self.probe is not None else {}
            if state["step"] == 0:
                self.log(f"policy: {self.host.describe()}")
                history["eval_before"] = before = self.validate(0)
                self._log_row(logger, 0, {**before, **probed, **self.host.take_perf_metrics()})  # the engine's build time
            for step in range(state["step"] + 1, run.steps + 1):
                started = time.perf_counter()
                idx = self.sampler.next(cfg.data.prompt_batch_size)  # 1. a batch of B prompts
                # validation's and the probe's generation are not this step's; a refit they triggered serves it
                carried = {k: v for k, v in self.host.take_perf_metrics().items() if k.startswith("time/")}
                metrics = algorithm_step(cfg, self.host, self.reward_fn, self.loss_fn, self.prompts, idx, step)  # 2-10
                perf = self.host.take_perf_metrics()
                metrics.update({**perf, **{k: v + perf.get(k, 0.0) for k, v in carried.items()}})
                if self.probe is not None and self.probe.every and step % self.probe.every == 0:
                    metrics.update(self.probe_engine(step))
                metrics["train/epoch"] = float(self.sampler.epoch)
                state["optimizer_steps"] += int(metrics["optim/updates"] - metrics["optim/skipped"])
                history.setdefault("train_reward_first", metrics["train/reward"])
                history["train_reward_last"] = metrics["train/reward"]
                if (run.eval_every and step % run.eval_every == 0) or step == run.steps:  # 11. validate, log, checkpoint
                    metrics.update(self.validate(step))
                if step == run.steps:
                    history["eval_after"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
                metrics["time/step"] = time.perf_counter() - started
                if step % run.log_every == 0 or step == run.steps:
                    self._log_row(logger, step, metrics)
                self.log(f"step {step}/{run.steps}: reward {metrics['train/reward']:.3f}, guided {metrics['train/guided_frac']:.2f}, "
                         f"loss {metrics.get('loss/total', float('nan')):.4f}" + (f", eval {metrics['eval/pass1']:.3f}" if "eval/pass1" in metrics else ""))
                if (run.save_every and step % run.save_every == 0) or step == run.steps:
                    self.save(step)
                if step < run.steps and self.stop_requested():  # Slurm's time-limit signal (preempt.py)
                    self.preempt(step)
        finally:
            if logger is not None:
                logger.close()
        return history

    def probe_engine(self, step: int) -> dict[str, float]:
        """The TensorRT-LLM probe on the first ``probe_prompts`` training prompts (plain), logged;
        raises :class:`~nemo_guide.aligner.probe.ProbeError` above a tolerance."""
        gen, settings = self.config.generation, self.probe
        prompts = [p.ids for p in self.prompts.plain[: settings.prompts]]
        report = run_probe(self.host, prompts, settings, step=step, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                           top_p=gen.top_p, seed=step_seed(self.config.run.seed, step, PROBE_PHASE))
        self.log(report.format(settings))
        self.state["history"].setdefault("probes", []).append({"step": step, **report.metrics()})
        check(report, settings)
        return report.metrics()

    def validate(self, step: int) -> dict[str, float]:
        """Held-out pass@1 without hints (greedy at ``generation.eval_temperature = 0``)."""
        if self.eval_prompts is None:
            return {}
        gen = self.config.generation
        started = time.perf_counter()
        out = heldout_pass1(self.host, self.host, self.reward_fn, self.eval_prompts, max_new_tokens=gen.max_new_tokens,
                            temperature=gen.eval_temperature, top_p=gen.top_p, seed=step_seed(self.config.run.seed, step, EVAL_PHASE))
        return {**out, "time/eval": time.perf_counter() - started}

    def preempt(self, step: int) -> None:
        """Checkpoint ``step`` (unless just done) and raise :class:`Preempted` (exit code 75 in ``train.main``)."""
        if self.saved_step != step:
            self.save(step)
        raise Preempted(step)

    def save(self, step: int) -> None:
        """The side file (rank 0, atomic), then Aligner's checkpoint (all ranks)."""
        self.saved_step = step
        self.state.update(step=step, sampler=self.sampler.state())
        if self.rank0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(state_file(self.checkpoint_dir, step), json.dumps(self.state, indent=2, sort_keys=True))
        dist.barrier()
        self.host._training()  # Aligner saves with the optimizer states on board
        candidates = {
            "step": torch.tensor(step, dtype=torch.int32),
            "epoch": torch.tensor(self.sampler.epoch, dtype=torch.int32),
            "optimizer_steps": torch.tensor(self.state["optimizer_steps"], dtype=torch.int32),
        }
        self.ckpt_callback.custom_save(monitor_candidates=candidates, is_train_end=step == self.config.run.steps)
        dist.barrier()

    def _log_row(self, logger: MetricsLogger | None, step: int, metrics: dict[str, float]) -> None:
        if logger is not None and metrics:
            logger.log(step, metrics)
        if self.nemo_logger is not None and metrics:
            self.nemo_logger.log_metrics(metrics, step=step, prefix="")
