"""``nemo-guide plan CONFIG [key=value ...] [--nodes N] [--gpus-per-node G] [--gpu-memory GiB] [--json]``.

Exit code 0 when the run fits, 1 when it does not (or cannot start), 2 for a bad config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run_config(path: str, overrides: list[str]) -> dict:
    """A NeMo-Aligner run config with ``key=value`` overrides, as a plain resolved container."""
    from omegaconf import OmegaConf

    from nemo_guide.errors import RunError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    cfg = OmegaConf.load(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RunError(f"overrides must be key=value, got {' '.join(bad)}")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    return OmegaConf.to_container(cfg, resolve=True)


def run_plan(args: argparse.Namespace) -> int:
    from nemo_guide.planner import plan_config, plan_json, plan_text

    cfg = load_run_config(args.config, list(args.overrides))
    plan, fix = plan_config(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory, source=args.config)
    if args.json:
        print(json.dumps(plan_json(plan, fix, config=args.config), indent=2))
    else:
        print(plan_text(plan, fix, config=args.config))
    return 0 if plan.fits else 1
