"""A Megatron-core ``GPTModel`` for Qwen2 / Llama, built from a ``ModelShape`` for this rank.

Call after ``parallel_state.initialize_model_parallel``: the model is this rank's pipeline
stage (``pre_process`` on the first, ``post_process`` on the last) with this rank's
tensor-parallel shards. ``hidden_states`` runs the stage without the output layer, so the
log-prob path never builds ``[s, b, V/tp]`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from nemo_guide.backends.megatron._mcore import (
    HAVE_TE,
    GPTModel,
    TransformerConfig,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    parallel_state,
)
from nemo_guide.convert import ModelShape, hf_to_megatron, load_hf_state_dict, pipeline_stage, read_hf_shape, shard_tp, to_te_names

LayerSpec = Literal["auto", "local", "te"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MegatronModelConfig:
    """How to build this rank's model."""

    dtype: str = "bfloat16"
    """Parameter dtype: float32 | bfloat16 | float16."""
    layer_spec: LayerSpec = "auto"
    """local (plain torch layers, runs on CPU) | te (TransformerEngine) | auto (te when importable on CUDA)."""
    recompute_activations: bool = False
    """Recompute each layer's activations in backward (Megatron's full, uniform recompute)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in _DTYPES:
            problems.append(f"dtype = {self.dtype!r}: choose one of {', '.join(_DTYPES)}")
        if self.layer_spec not in ("auto", "local", "te"):
            problems.append(f"layer_spec = {self.layer_spec!r}: choose auto, local or te")
        if self.layer_spec == "te" and not HAVE_TE:
            problems.append("layer_spec = 'te' but transformer_engine is not importable; use the NGC container or layer_spec=local")
        if problems:
            raise ValueError("invalid Megatron model config: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def use_te(self) -> bool:
        return self.layer_spec == "te" or (self.layer_spec == "auto" and HAVE_TE and torch.cuda.is_available())


def initialize_parallel(tensor_parallel: int, pipeline_parallel: int) -> None:
    """Megatron's parallel state for ``backend.tensor_parallel`` x ``backend.pipeline_parallel``
    (data parallel = the rest of the world). Call once per process after ``init_process_group``."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; launch with srun/torchrun and call init_process_group first")
    world = dist.get_world_size()
    if tensor_parallel < 1 or pipeline_parallel < 1 or world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} does not split into backend.tensor_parallel={tensor_parallel} x "
            f"backend.pipeline_parallel={pipeline_parallel} model-parallel groups; launch a multiple of "
            f"{max(1, tensor_parallel * pipeline_parallel)} ranks or change the sizes"
        )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)


def transformer_config(shape: ModelShape, cfg: MegatronModelConfig, *, on_cpu: bool = False) -> TransformerConfig:
    """Megatron's ``TransformerConfig`` for ``shape`` under the current parallel state."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    shape.check_parallel(tp, pp)
    dtype = cfg.torch_dtype
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        # fusions need CUDA/apex kernels; the local spec runs without them
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # the policy loss already carries each micro-batch's share of the mini-batch
        calculate_per_token_loss=True,
        recompute_granularity="full" if cfg.recompute_activations else None,
        recompute_method="uniform" if cfg.recompute_activations else None,
        recompute_num_layers=1 if cfg.recompute_activations else None,
    )


def build_model(shape: ModelShape, cfg: MegatronModelConfig, *, device: str = "auto") -> GPTModel:
    """This rank's pipeline stage of the model (random weights; see :func:`load_rank_weights`).

    ``device``: ``auto`` (the current CUDA device when there is one, else CPU) or ``cpu``.
    """
    if device not in ("auto", "cpu"):
        raise ValueError(f"device = {device!r}: choose auto or cpu")
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    config = transformer_config(shape, cfg, on_cpu=on_cpu)
    spec = get_gpt_layer_with_transformer_engine_spec() if cfg.use_te() else get_gpt_layer_local_spec()
    model = GPTModel(
        config,
        spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rope_theta,
        rope_scaling=shape.rope_llama3_scaling,
    )
    if not on_cpu:
        model.cuda(torch.cuda.current_device())
    return model


def rank_state_dict(full_megatron: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """This rank's part (pipeline stage, then tensor-parallel shard) of a full Megatron state dict."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = pipeline_stage(full_megatron, shape, pp, parallel_state.get_pipeline_model_parallel_rank())
    return shard_tp(stage, shape, tp, parallel_state.get_tensor_model_parallel_rank())


def load_rank_weights(model: GPTModel, full_megatron: dict[str, torch.Tensor], shape: ModelShape) -> None:
    """Copy this rank's shards of ``full_megatron`` (local-spec names) into ``model``.

    Raises ``RuntimeError`` listing any parameter the checkpoint does not cover or any
    tensor the model has no place for.
    """
    part = rank_state_dict(full_megatron, shape)
    own = model.state_dict()
    if not any(k.endswith("input_layernorm.weight") for k in own):
        part = to_te_names(part)
    wanted = {k for k, v in own.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    missing, unexpected = sorted(wanted - set(part)), sorted(set(part) - wanted)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = [f"{k}: {tuple(part[k].shape)} vs {tuple(own[k].shape)}" for k in wanted if part[k].shape != own[k].shape]
    if bad:
        raise RuntimeError("checkpoint shapes do not fit the model: " + "; ".join(bad[:8]))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key in wanted:
            target = params.get(key)
            (target if target is not None else own[key]).copy_(part[key])


def load_hf_model(model_dir: str | Path, cfg: MegatronModelConfig, *, device: str = "auto") -> tuple[GPTModel, ModelShape]:
    """Build this rank's stage and load a Hugging Face Qwen2/Llama checkpoint into it."""
    shape, _ = read_hf_shape(model_dir)
    model = build_model(shape, cfg, device=device)
    full = hf_to_megatron(load_hf_state_dict(model_dir), shape, source=str(model_dir))
    load_rank_weights(model, full, shape)
    return model, shape


def output_weight(model: GPTModel) -> torch.Tensor:
    """The output layer's vocabulary shard on the last stage. Shape: ``[V/tp, H]``."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def hidden_states(model: GPTModel, tokens: torch.Tensor | None) -> torch.Tensor:
    """Run this pipeline stage without the output layer.

    Args:
        tokens: Shape: ``[b, s]`` token ids (used on the first stage; later stages read the
            tensor the schedule set with ``set_input_tensor``). Rows are right-padded, so
            causal attention alone keeps padding out of every real token's context.

    Returns:
        Shape: ``[s, b, H]``: after the final norm on the last stage, else the stage's
        output for the next one.
    """
    decoder_input = None
    if model.pre_process:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)  # [b, s]
        decoder_input = model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, H]
    seq_len = model.rotary_pos_emb.get_rotary_seq_len(None, model.decoder, decoder_input, model.config, None)
    rotary = model.rotary_pos_emb(seq_len)
    return model.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary)
