"""``python -m nemo_guide.aligner.train --config-path <dir> --config-name <name> [key=value ...]``

Guide-GRPO on NeMo-Aligner, the way Aligner's ``train_gpt_reinforce_actor.py`` runs
REINFORCE (one process per GPU under ``srun``/``torchrun``). In order:

1. the config's Guide sections and layout are validated (:func:`nemo_guide.aligner.config.guide_config`);
2. the records are loaded and every prompt (plain and hinted) is tokenised with the
   checkpoint's tokenizer and checked against the context and the engine's input length;
   nothing else happens if anything is wrong, and every problem is listed at once;
3. the actor is restored from ``pretrained_checkpoint.restore_from_path`` (a ``.nemo``), with
   NeMo's experiment manager (resume from the newest checkpoint when ``resume_if_exists``);
4. :class:`~nemo_guide.aligner.trainer.GuideGRPOTrainer` runs ``trainer.guide.run.steps`` steps.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_guide.aligner.config import GUIDE, guide_config, probe_settings, prompt_limit
from nemo_guide.aligner.preempt import PREEMPTED_EXIT, Preempted, StopRequest
from nemo_guide.config import Config
from nemo_guide.errors import RunError
from nemo_guide.loop import load_prompts, reward_name
from nemo_guide.prompts import PromptSet


class CheckpointTokenizer:
    """The ``PromptTokenizer`` of a Hugging Face tokenizer directory, before any model exists
    (the same ids the actor's NeMo ``AutoTokenizer`` gives: it wraps the same files)."""

    def __init__(self, directory: str | Path, context: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if self.tokenizer.eos_token_id is None:
            raise RunError(f"{directory}: the tokenizer has no eos_token; set one in tokenizer_config.json")
        self.eos_ids = (int(self.tokenizer.eos_token_id),)
        self.pad_id = self.eos_ids[0]
        self.max_length = context
        self.chat_tokenizer = self.tokenizer

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def tokenizer_directory(cfg: DictConfig) -> Path:
    """Where the run's Hugging Face tokenizer files are: ``model.tokenizer.type`` when it names a
    directory here (from the config, else from the ``.nemo``'s ``model_config.yaml``); otherwise
    the tokenizer ``nemo-guide convert hf-to-nemo`` bundled in the ``.nemo``, extracted next to
    the run's logs. ``cfg.model.tokenizer.type`` is set to the directory found, so NeMo loads the
    same files."""
    from nemo_guide.convert.nemo_file import extract_tokenizer, read_nemo_config

    restore = cfg.get("pretrained_checkpoint", {}).get("restore_from_path")
    tok = dict(cfg.model.get("tokenizer") or {})
    if not tok.get("type") and restore:
        tok = dict(read_nemo_config(Path(str(restore))).get("tokenizer") or {})
    if tok.get("library", "huggingface") != "huggingface":
        raise RunError(f"model.tokenizer.library = {tok.get('library')!r}: the Guide trainer reads Hugging Face tokenizers; convert the model with `nemo-guide convert hf-to-nemo`")
    found = Path(str(tok["type"])) if tok.get("type") and Path(str(tok["type"])).is_dir() else None
    if found is None:
        if not restore:
            raise RunError(f"model.tokenizer.type = {tok.get('type')!r} is not a directory, and there is no pretrained_checkpoint.restore_from_path to take the tokenizer from")
        log_dir = cfg.get("exp_manager", {}).get("explicit_log_dir") if cfg.get("exp_manager") else None
        found = extract_tokenizer(Path(str(restore)), Path(str(log_dir or ".")) / "nemo_tokenizer")
    with open_dict(cfg.model):
        cfg.model.tokenizer = {**tok, "library": "huggingface", "type": str(found.resolve())}
    return found


def prepare(cfg: DictConfig, *, source: str) -> tuple[Config, PromptSet, PromptSet | None]:
    """Steps 1-2: the validated Guide config and the tokenised prompts; builds no model.

    ``cfg.model`` becomes the ``.nemo``'s ``model_config.yaml`` overridden by the config's
    ``model`` section (what Aligner's ``load_and_override_model_config`` does at build time)."""
    restore = cfg.get("pretrained_checkpoint", {}).get("restore_from_path")
    if restore:
        from nemo_guide.convert.nemo_file import read_nemo_config

        base = OmegaConf.create(read_nemo_config(Path(str(restore))))
        for key in ("target", "nemo_version"):
            base.pop(key, None)
        with open_dict(cfg):
            cfg.model = OmegaConf.merge(base, cfg.model)
    container: Any = OmegaConf.to_container(cfg, resolve=True)
    config = guide_config(container, source=source, complete_model=bool(restore))
    check_memory(container, source=source)
    tokenizer = CheckpointTokenizer(tokenizer_directory(cfg), int(cfg.model.encoder_seq_length))
    train_prompts, eval_prompts = load_prompts(config, tokenizer)
    limit, key = prompt_limit(container, config)
    too_long = [(r.id, len(p.ids)) for r, pair in zip(train_prompts.records, zip(train_prompts.plain, train_prompts.hinted, strict=True), strict=True)
                for p in pair if p is not None and len(p.ids) > limit]
    if too_long:
        listed = ", ".join(f"{rid!r} ({n} tokens)" for rid, n in too_long[:10])
        raise RunError(f"{config.data.train}: {len(too_long)} prompt(s) longer than {limit} tokens ({key}), hinted ones included: {listed}; raise {key}")
    return config, train_prompts, eval_prompts


def check_memory(container: dict, *, source: str) -> None:
    """``nemo-guide plan``'s verdict for this GPU's memory, before anything is built; skipped on CPU
    and with ``model.guide_memory_check=false`` (the planner estimates: it can be wrong)."""
    import torch

    if not torch.cuda.is_available() or not (container.get("model") or {}).get("guide_memory_check", True):
        return
    from nemo_guide.planner import check_memory as plan_check

    plan_check(container, gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30, source=source)


def run(cfg: DictConfig, *, source: str = "config", reward_fn=None, log=print) -> dict[str, Any]:
    """Steps 1-4 on this rank; returns the run's history (evaluations before and after).

    ``reward_fn`` replaces the configured verifier (tests); it is still run on the
    model-parallel source ranks."""
    config, train_prompts, eval_prompts = prepare(cfg, source=source)
    if cfg.model.get("ppo", {}).get("trt_llm", {}).get("enable", False) and importlib.util.find_spec("tensorrt_llm") is None:
        raise RunError("model.ppo.trt_llm.enable = true, but TensorRT-LLM is not installed here (use NeMo-Aligner's image); set it false to generate with Megatron")
    import torch.distributed as dist  # NeMo and Aligner load only once the config and data are known to be good

    from nemo_guide.aligner.build import build_actor
    from nemo_guide.aligner.host import AlignerHost
    from nemo_guide.aligner.parallel import SourceRankReward
    from nemo_guide.aligner.trainer import GuideGRPOTrainer, resume_state
    from nemo_guide.rewards import make_reward
    from nemo_guide.steps import policy_loss_fn, sft_loss_fn

    algo = config.algorithm
    most_rollouts = 2 * config.data.prompt_batch_size * algo.group_size  # every prompt guided
    updates_per_step = algo.ppo_epochs * (1 if config.optim.mini_batch_size is None else -(-most_rollouts // config.optim.mini_batch_size))
    built = build_actor(cfg, optimizer_steps=config.run.steps * updates_per_step)
    host = AlignerHost(built.actor, built.optimizer, built.scheduler, grad_clip=float(cfg.trainer.get("gradient_clip_val") or 0.0),
                       rollout_micro_batch_size=int(cfg.model.ppo.rollout_micro_batch_size))
    if algo.kl_coef > 0:
        host.snapshot_reference()
    reward_fn = SourceRankReward(reward_fn or make_reward(reward_name(config), num_workers=config.data.reward_workers))
    loss_fn = sft_loss_fn if algo.mode == "sft" else policy_loss_fn(algo, config.data.prompt_batch_size)
    log_dir = Path(str(cfg.exp_manager.explicit_log_dir)) if cfg.get("exp_manager") and cfg.exp_manager.get("explicit_log_dir") else config.run.run_dir
    checkpoint_dir = Path(getattr(built.ckpt_callback, "dirpath", None) or log_dir / "checkpoints")
    if config.run.save_every and not hasattr(built.ckpt_callback, "dirpath"):
        raise RunError(f"{GUIDE}.run.save_every = {config.run.save_every} but no checkpoint callback exists: set exp_manager.create_checkpoint_callback = true")
    state = resume_state(built.trainer.ckpt_path, checkpoint_dir)
    if state["step"] and dist.get_rank() == 0:
        log(f"resuming at step {state['step']} from {built.trainer.ckpt_path}")
    trainer = GuideGRPOTrainer(
        config, host, train_prompts, eval_prompts, reward_fn, loss_fn, ckpt_callback=built.ckpt_callback, checkpoint_dir=checkpoint_dir,
        run_dir=log_dir / "guide", state=state, nemo_logger=built.logger, log=log, stop_requested=StopRequest(),
        probe=probe_settings(OmegaConf.to_container(cfg, resolve=True)),
    )
    try:
        return trainer.fit()
    finally:
        reward_fn.close()


def main() -> None:
    from nemo.core.config import hydra_runner

    @hydra_runner(config_path=str(Path.cwd() / "conf" / "aligner"), config_name="tiny_cpu")
    def entry(cfg: DictConfig) -> None:
        try:
            run(cfg, source=f"{GUIDE} of the Hydra config")
        except (RunError, ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except Preempted as exc:  # slurm/guide_grpo.sbatch requeues the job on this exit code
            print(str(exc), file=sys.stderr)
            raise SystemExit(PREEMPTED_EXIT) from None

    entry()


if __name__ == "__main__":
    main()
