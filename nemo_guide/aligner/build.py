"""Building the Guide actor the way Aligner's train scripts build theirs.

:func:`build_actor` follows ``examples/nlp/gpt/train_gpt_reinforce_actor.py`` of
NeMo-Aligner 0.7.0: a Lightning trainer from the config (``resolve_and_create_trainer``),
NeMo's experiment manager (logs, checkpoint callback, ``resume_if_exists``), the model
restored from a ``.nemo`` (or freshly initialised when no checkpoint is given: tests),
the process groups through Lightning's strategy, the optimizer and LR schedule through
``init_using_ptl`` (which also restores them when resuming), and Aligner's checkpoint
callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.utils import divide
from nemo.utils.exp_manager import exp_manager
from nemo_aligner.utils import parallel_state
from nemo_aligner.utils.train_script_utils import (
    CustomLoggerWrapper,
    add_custom_checkpoint_callback,
    extract_optimizer_scheduler_from_ptl_model,
    init_distributed,
    init_using_ptl,
    resolve_and_create_trainer,
)
from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo
from omegaconf import DictConfig

from nemo_guide.aligner.actor import MegatronGPTGuideActorModel

TRAINER_KEY = "guide"
"""The section under ``trainer`` that holds Guide's settings (removed while Lightning's Trainer is built)."""


@dataclass
class Built:
    actor: MegatronGPTGuideActorModel
    trainer: Any
    optimizer: Any
    scheduler: Any
    ckpt_callback: Any
    logger: CustomLoggerWrapper


def build_actor(cfg: DictConfig, *, optimizer_steps: int) -> Built:
    """The actor, its optimizer and scheduler, and Aligner's checkpoint callback.

    Args:
        cfg: the whole Hydra config (``trainer``, ``model``, ``exp_manager``,
            ``pretrained_checkpoint``). With ``pretrained_checkpoint.restore_from_path`` null
            the model is initialised from ``model`` alone (random weights, for tests).
        optimizer_steps: an upper bound on optimizer steps in the run; NeMo sizes the LR
            schedule from the training data loader, which here is a stand-in of that length.
    """
    restore = cfg.get("pretrained_checkpoint", {}).get("restore_from_path")
    if restore:
        cfg.model = load_and_override_model_config(restore, cfg.model)
    trainer = resolve_and_create_trainer(cfg, TRAINER_KEY)
    if cfg.get("exp_manager") is not None:
        exp_manager(trainer, cfg.exp_manager)
    logger = CustomLoggerWrapper(trainer.loggers)
    if restore:
        actor = load_from_nemo(MegatronGPTGuideActorModel, cfg.model, trainer, strict=True, restore_path=restore)
    else:
        actor = MegatronGPTGuideActorModel(cfg.model, trainer)
    init_distributed(trainer, actor, cfg.model.get("transformer_engine", False))
    # NeMo computes the LR schedule's length from the train loader: one item per optimizer step per replica.
    per_replica = divide(int(cfg.model.global_batch_size), parallel_state.get_data_parallel_world_size())
    stand_in = list(range(max(1, optimizer_steps) * per_replica))
    init_using_ptl(trainer, actor, torch.utils.data.DataLoader(stand_in, batch_size=per_replica), stand_in)
    del actor._train_dl  # the stand-in must never be iterated
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(actor)
    ckpt_callback = add_custom_checkpoint_callback(trainer, actor)
    return Built(actor, trainer, optimizer, scheduler, ckpt_callback, logger)
