"""A NeMo-Aligner run config (``conf/aligner/*.yaml``) -> :class:`~nemo_guide.planner.plan.PlanInputs`.

The model's shape is read from the ``.nemo``'s ``model_config.yaml`` when
``pretrained_checkpoint.restore_from_path`` names a file that exists here (the config's ``model``
section overrides it, as Aligner's ``load_and_override_model_config`` does), else from the same
keys written in the config's ``model`` section. Keys read (NeMo's names):

- shape: ``num_layers``, ``hidden_size``, ``ffn_hidden_size``, ``num_attention_heads``,
  ``num_query_groups`` (default: heads), ``kv_channels`` (default: hidden / heads),
  ``override_vocab_size``, ``share_embeddings_and_output_weights``, ``qkv_bias``, ``bias``,
  ``activation``, ``hidden_dropout``, ``attention_dropout``;
- layout: ``trainer.num_nodes``, ``trainer.devices``, ``model.tensor_model_parallel_size``,
  ``model.pipeline_model_parallel_size``, ``model.sequence_parallel``;
- precision and optimizer: ``trainer.precision`` / ``model.precision``, ``model.megatron_amp_O2``,
  ``model.optim.name``, ``model.optim.store_params``, ``model.optim.grad_sync_dtype``,
  ``model.ppo.offload_adam_states``;
- activations: ``model.micro_batch_size``, ``model.transformer_engine`` (flash attention),
  ``model.activations_checkpoint_granularity`` / ``_method`` / ``_num_layers``,
  ``model.guide_logprob_chunk_size``;
- generation: ``model.ppo.rollout_micro_batch_size`` (the engine's batch),
  ``model.ppo.trt_llm.{enable, reshard, unload_engine_train, max_input_len}``,
  ``model.ppo.length_params.max_length``;
- the Guide sections (``trainer.guide``): prompts per step, k, mode, prompt and response
  lengths, mini-batch, PPO epochs, entropy coefficient.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from nemo_guide.aligner.config import guide_config, prompt_limit
from nemo_guide.errors import RunError
from nemo_guide.planner.memory import Activations, Engine, Shape, precision
from nemo_guide.planner.plan import PlanInputs

SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "override_vocab_size", "share_embeddings_and_output_weights", "qkv_bias", "bias", "activation")
REQUIRED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "override_vocab_size")


def get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def with_nemo_model(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` (a plain container) with ``model`` merged over the ``.nemo``'s model config when
    ``pretrained_checkpoint.restore_from_path`` exists here; unchanged otherwise.

    Raises:
        RunError: a shape key written in the config differs from the ``.nemo``'s (the run would
            build one model and load another's weights).
    """
    out = copy.deepcopy(dict(cfg))
    restore = get(cfg, "pretrained_checkpoint.restore_from_path")
    if not restore or not Path(str(restore)).is_file():
        return out
    from nemo_guide.convert.nemo_file import read_nemo_config

    base = read_nemo_config(Path(str(restore)))
    model = dict(out.get("model") or {})
    differ = [f"model.{k} = {model[k]!r} (the .nemo has {base[k]!r})" for k in SHAPE_KEYS
              if k in model and k in base and model[k] is not None and model[k] != base[k]]
    if differ:
        raise RunError(f"{restore}: the config's model shape differs from the checkpoint's: {'; '.join(differ)}; "
                       "delete these keys from the config or point pretrained_checkpoint.restore_from_path at the matching .nemo")
    out["model"] = {**base, **model}
    return out


def read_shape(cfg: Mapping[str, Any]) -> Shape:
    """The model's :class:`Shape` from ``cfg['model']`` (already merged with the ``.nemo``)."""
    model = cfg.get("model") or {}
    missing = [f"model.{k}" for k in REQUIRED if model.get(k) is None]
    if missing:
        raise RunError(f"the model's shape is unknown: {', '.join(missing)} missing; write them in the config (NeMo's model_config.yaml keys) "
                       "or set pretrained_checkpoint.restore_from_path to a .nemo that exists here")
    heads = int(model["num_attention_heads"])
    return Shape(
        num_layers=int(model["num_layers"]),
        hidden_size=int(model["hidden_size"]),
        ffn_hidden_size=int(model["ffn_hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(model.get("num_query_groups") or heads),
        head_dim=int(model.get("kv_channels") or int(model["hidden_size"]) // heads),
        vocab_size=int(model["override_vocab_size"]),
        tied=bool(model.get("share_embeddings_and_output_weights", False)),
        qkv_bias=bool(model.get("qkv_bias", False)),
        linear_bias=bool(model.get("bias", False)),
        gated=str(model.get("activation", "fast-swiglu")).endswith(("swiglu", "geglu", "reglu")),
        hidden_dropout=float(model.get("hidden_dropout") or 0.0),
        attention_dropout=float(model.get("attention_dropout") or 0.0),
    )


def plan_inputs(cfg: Mapping[str, Any], *, nodes: int | None = None, gpus_per_node: int | None = None,
                gpu_memory_gib: float = 80.0, source: str = "config") -> PlanInputs:
    """Everything the planner needs from a plain-container run config (validated first).

    Raises:
        ConfigError: the Guide sections or layout are invalid (``guide_config``'s checks).
        RunError: the model's shape is unknown or disagrees with the ``.nemo``.
    """
    from nemo_guide.planner.plan import Layout, Workload

    cfg = with_nemo_model(cfg)
    if nodes is not None or gpus_per_node is not None:
        cfg.setdefault("trainer", {})
        cfg["trainer"] = {**cfg["trainer"], **({"num_nodes": nodes} if nodes else {}), **({"devices": gpus_per_node} if gpus_per_node else {})}
    config = guide_config(cfg, source=source)
    shape = read_shape(cfg)
    limit, _ = prompt_limit(cfg, config)
    trt = bool(get(cfg, "model.ppo.trt_llm.enable", False))
    prec_name = str(get(cfg, "model.precision", get(cfg, "trainer.precision", 32)))
    half = prec_name in ("16", "bf16", "16-mixed", "bf16-mixed") and bool(get(cfg, "model.megatron_amp_O2", False))
    optim = str(get(cfg, "model.optim.name", "fused_adam"))
    granularity = get(cfg, "model.activations_checkpoint_granularity")
    lay = Layout(int(get(cfg, "trainer.num_nodes", 1)), int(get(cfg, "trainer.devices", 1)), int(get(cfg, "model.tensor_model_parallel_size", 1)),
                 int(get(cfg, "model.pipeline_model_parallel_size", 1)), bool(get(cfg, "model.sequence_parallel", False)))
    work = Workload(config.data.prompt_batch_size, config.algorithm.group_size, config.algorithm.mode == "guide_grpo" and config.algorithm.guidance_threshold != "never",
                    limit, config.generation.max_new_tokens, config.optim.mini_batch_size, config.algorithm.ppo_epochs)
    acts = Activations(config.optim.micro_batch_size, work.seq_len, lay.tp, lay.sequence_parallel and lay.tp > 1,
                       flash=bool(get(cfg, "model.transformer_engine", False)), recompute=granularity,
                       recompute_method=str(get(cfg, "model.activations_checkpoint_method", "uniform")),
                       recompute_layers=int(get(cfg, "model.activations_checkpoint_num_layers", 1)))
    engine = Engine(trt, int(get(cfg, "model.ppo.rollout_micro_batch_size", 1)),
                    int(get(cfg, "model.ppo.trt_llm.max_input_len", limit)) if trt else limit,
                    int(get(cfg, "model.ppo.length_params.max_length", config.generation.max_new_tokens)) if trt else config.generation.max_new_tokens,
                    reshard=bool(get(cfg, "model.ppo.trt_llm.reshard", False)), unload_during_training=bool(get(cfg, "model.ppo.trt_llm.unload_engine_train", False)))
    return PlanInputs(
        shape, lay, work, precision(optim, half_params=half, fp16=prec_name in ("16", "16-mixed"), store_params=get(cfg, "model.optim.store_params"),
                  half_grads=str(get(cfg, "model.optim.grad_sync_dtype", "fp32")) in ("bf16", "fp16", "16", "torch.bfloat16", "torch.float16")),
        acts, engine, logprob_chunk=int(get(cfg, "model.guide_logprob_chunk_size", 1024)), with_entropy=config.algorithm.entropy_coef != 0,
        offload_optimizer=bool(get(cfg, "model.ppo.offload_adam_states", False)) and optim == "distributed_fused_adam",
        gpu_memory_gib=gpu_memory_gib,
    )
