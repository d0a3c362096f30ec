"""The ``nemo-guide`` command line. Entry points pick a backend; nothing below them does."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(args: argparse.Namespace):
    from nemo_guide.config import load_config

    return load_config(args.config, list(args.overrides))


def make_backend(cfg):
    """The configured :class:`~nemo_guide.backends.base.PolicyBackend`."""
    if cfg.backend.name == "torch":
        from nemo_guide.backends.torch.backend import TorchBackend

        return TorchBackend(cfg.backend, cfg.optim, temperature=cfg.generation.temperature, seed=cfg.run.seed)
    raise SystemExit(
        "backend.name=megatron runs under srun: python -m nemo_guide.train_megatron (see README, 'Scale-out'); "
        "`nemo-guide train` runs the embedded torch backend"
    )


def _split_checkpoint(overrides: list[str]) -> tuple[list[str], str | None]:
    rest, ckpt = [], None
    for item in overrides:
        if item.startswith("checkpoint="):
            ckpt = item.split("=", 1)[1]
        else:
            rest.append(item)
    return rest, ckpt


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from nemo_guide.loop import train

    cfg = _load(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = make_backend(cfg)
    summary = train(cfg, backend, progress=not args.no_progress)
    keys = ("steps", "wall_seconds", "train_reward_first", "train_reward_last", "eval_before", "eval_after")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from nemo_guide.data.sources import default_reward
    from nemo_guide.loop import evaluate, load_eval_prompts
    from nemo_guide.rewards import make_reward

    overrides, ckpt = _split_checkpoint(list(args.overrides))
    args.overrides = overrides
    cfg = _load(args)
    backend = make_backend(cfg)
    if ckpt is not None:
        backend.load(Path(ckpt), weights_only=True)
    prompts = load_eval_prompts(cfg, backend)
    reward_fn = make_reward(default_reward(cfg.data.train) if cfg.data.reward == "auto" else cfg.data.reward)
    try:
        result = evaluate(backend, prompts, reward_fn, max_new_tokens=cfg.generation.max_new_tokens, temperature=cfg.generation.eval_temperature, top_p=cfg.generation.top_p, seed=cfg.run.seed)
    finally:
        reward_fn.close()
    result["checkpoint"] = ckpt or cfg.backend.model
    print(json.dumps(result, indent=2))
    return 0


def _cmd_warmstart(args: argparse.Namespace) -> int:
    import torch

    from nemo_guide.backends.torch.warmstart import ASSET, build_warmstart

    if args.threads:
        torch.set_num_threads(args.threads)
    build_warmstart(args.out or ASSET, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nemo_guide.backends.torch.warmstart import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="nemo-guide", description="Guide-GRPO: adaptive guidance for RL of reasoning LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="validate a YAML config (with key=value overrides) and print it resolved")
    p.add_argument("config", help="path to a YAML config, e.g. conf/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.group_size=4")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("train", help="train with the embedded backend (writes runs/<run.name>/)")
    p.add_argument("config", help="path to a YAML config, e.g. conf/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=10 algorithm.mode=grpo")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="held-out pass@1 without hints of a checkpoint (or of backend.model)")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("overrides", nargs="*", help="checkpoint=runs/<name>/checkpoints/step_000060 and key=value overrides")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("warmstart", help="build the built-in tiny policy (SFT on the digit-ops task)")
    p.add_argument("--out", default=None, help="output .safetensors (default: the packaged builtin:tiny asset)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_cmd_warmstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nemo_guide.config import ConfigError
    from nemo_guide.data.records import DataError
    from nemo_guide.loop import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, RunError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
