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


def is_aligner_config(path: str) -> bool:
    """Whether ``path`` is a NeMo-Aligner run config (it has a ``trainer.guide`` section)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(OmegaConf.load(path), "trainer.guide") is not None
    except Exception:  # not YAML, missing: the embedded loader reports it in its words
        return False


def run_aligner_config(args: argparse.Namespace) -> int:
    """``nemo-guide config`` on a NeMo-Aligner run config: ``guide_config``'s checks (every problem
    at once), then the Guide sections as the trainer reads them and the run's layout."""
    from nemo_guide.aligner.config import guide_config

    cfg = load_run_config(args.config, list(args.overrides))
    config = guide_config(cfg, source=args.config)
    model, trainer = cfg.get("model") or {}, cfg.get("trainer") or {}
    layout = {k: model.get(k) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel", "micro_batch_size", "encoder_seq_length")}
    layout.update(num_nodes=trainer.get("num_nodes"), devices=trainer.get("devices"))
    print(json.dumps({"trainer.guide": config.to_dict(), "layout": layout}, indent=2))
    return 0
