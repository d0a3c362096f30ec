"""TensorRT-LLM 0.13 export of a Megatron GPT (Llama, Qwen2), as pure functions of plain dicts and tensors.

**The trap this module exists for.** The pinned export path loses Qwen2's QKV bias: NeMo 2.1's
``TensorRTLLM.get_transformer_config`` (``nemo/export/tensorrt_llm.py:508``) sets
``add_bias_linear`` from the model's ``bias`` and never reads ``qkv_bias``; megatron-core 0.10's
``TRTLLMHelper._get_trtllm_config`` (``export/trtllm/trtllm_helper.py:150``) passes that flag as
``bias`` to TensorRT-LLM's ``LLaMAConfig``, whose attention bias is a different field,
``attn_bias``. The engine is built without attention biases; the converter does produce the
``attention.qkv.bias`` tensors, but the build drops them ("provided but not required") and every
refit skips them with a log warning (``nemo/export/trt_llm/tensorrt_llm_run.py:549-566``). The
engine then samples from Qwen2 *without* its QKV bias while the trainer scores with it.

**The fix.** :func:`trtllm_config` sets ``attn_bias`` from ``qkv_bias``; TensorRT-LLM's attention
then also carries a bias on its output projection (``dense``, whose bias defaults to the
attention's), which Megatron's Qwen2 has not, so :func:`engine_weights` supplies it as zeros.
:func:`engine_weight_shapes` lists every tensor a TP rank's engine holds, and
:func:`refit_problems` turns any name the engine lacks (or does not get) into an error instead
of a skipped weight. :func:`export_problems` refuses, naming the model field, every model this
export cannot reproduce faithfully (linear biases, LayerNorm, non-gated MLPs, MoE, ...).

Layouts (one TP rank of ``tp``; ``N_q`` query heads, ``N_kv`` key/value heads, head size ``D``):
Megatron's ``linear_qkv`` interleaves q/k/v per query group; the engine's ``attention.qkv`` is
``[q; k; v]`` of the rank's heads, ``[(N_q + 2 N_kv) D / tp, H]`` (its bias likewise). Megatron's
``linear_fc1`` ``[gate; up]`` becomes the engine's ``mlp.fc`` (the activated half, = gate) and
``mlp.gate`` (the linear half, = up). The vocabulary (embedding and ``lm_head``) is cut to the
tokenizer's ``V`` rows and split in ``ceil(V / tp)``-row shards, the last one zero-padded.

Nothing here imports TensorRT-LLM, NeMo or Megatron; :mod:`nemo_guide.aligner.trt_engine` uses
these functions to build and refit engines on GPUs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from nemo_guide.convert.mapping import from_te_names
from nemo_guide.errors import RunError

ARCHITECTURE = "LlamaForCausalLM"
GATED_ACTIVATIONS = ("swiglu", "fast-swiglu")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_PREFIXES = ("decoder.", "embedding.", "output_layer.")
NEMO_DEFAULTS = {"mcore_gpt": False, "bias": True, "normalization": "layernorm", "position_embedding_type": "learned_absolute",
                 "transformer_block_type": "pre_ln", "activation": "gelu"}
"""What NeMo 2.1's ``MegatronGPTModel`` assumes for a model config key that is absent."""
EXPORTABLE = {**NEMO_DEFAULTS, "mcore_gpt": True, "bias": False, "normalization": "rmsnorm", "position_embedding_type": "rope", "activation": "swiglu"}
"""The same keys with exportable values: what an absent key counts as while the model config is partial."""


class ExportError(RunError):
    """A model (or export setting) the TensorRT-LLM export cannot reproduce faithfully."""


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def nemo_fields(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The NeMo model config of ``model_cfg``: itself, or, for a Hugging Face ``config.json``
    dict (one with ``model_type``), the NeMo config ``nemo-guide convert`` writes for it."""
    if "model_type" in model_cfg and "num_hidden_layers" in model_cfg:
        from nemo_guide.convert.nemo_file import nemo_model_config
        from nemo_guide.convert.shape import shape_from_hf_config

        shape = shape_from_hf_config(dict(model_cfg), source="the Hugging Face config")
        return nemo_model_config(shape, dict(model_cfg), dtype="bfloat16", tokenizer="")
    return dict(model_cfg)


def engine_dtype(precision: Any) -> str:
    """TensorRT-LLM's dtype name for NeMo's ``trainer.precision`` / ``model.precision``."""
    text = str(precision)
    if text.startswith("bf16"):
        return "bfloat16"
    if text.startswith("16"):
        return "float16"
    if text.startswith("32"):
        return "float32"
    raise ExportError(f"model.precision = {precision!r}: the TensorRT-LLM export knows bf16, 16 and 32")


def export_problems(model_cfg: Mapping[str, Any], *, tp_size: int = 1, pp_size: int = 1, complete: bool = True) -> list[str]:
    """Every reason the export cannot reproduce ``model_cfg`` (a NeMo model config), each
    naming the ``model.<field>`` and what to do. Empty: exportable (Llama, Qwen2, Mistral
    without sliding windows: RMSNorm, SwiGLU, RoPE, GQA, optional QKV bias).

    ``complete``: ``model_cfg`` is the whole model config (the ``.nemo``'s merged in), so an
    absent key means NeMo's default (:data:`NEMO_DEFAULTS`); False checks present keys only (a
    run config whose ``.nemo`` is not at hand). ``pp_size``: the engine's pipeline stages."""
    given = {k: v for k, v in nemo_fields(model_cfg).items() if v is not None}
    cfg = {**(NEMO_DEFAULTS if complete else EXPORTABLE), **given}
    fix = "; generate with Megatron instead (model.ppo.trt_llm.enable = false)"
    out = []
    checks = [
        ("mcore_gpt", True, "the export reads megatron-core GPT models only"),
        ("bias", False, "biases on every linear layer have no faithful TensorRT-LLM Llama equivalent here (only the QKV bias, model.qkv_bias, is exported)"),
        ("normalization", "rmsnorm", "the Llama engine normalises with RMSNorm"),
        ("position_embedding_type", "rope", "the Llama engine uses rotary embeddings"),
        ("transformer_block_type", "pre_ln", "the Llama engine is pre-norm"),
    ]
    for key, wanted, why in checks:
        if cfg[key] != wanted:
            out.append(f"model.{key} = {cfg[key]!r}: {why}{fix}")
    if cfg["activation"] not in GATED_ACTIVATIONS:
        out.append(f"model.activation = {cfg['activation']!r}: the Llama engine's MLP is SwiGLU ({' or '.join(GATED_ACTIVATIONS)}){fix}")
    if float(_get(cfg, "rotary_percentage", 1.0)) != 1.0:
        out.append(f"model.rotary_percentage = {cfg['rotary_percentage']}: the Llama engine rotates every head dimension{fix}")
    for key, why in (("num_moe_experts", "mixture-of-experts layers"), ("qk_layernorm", "query/key normalisation"), ("window_size", "sliding-window attention"),
                     ("fp8", "FP8 weights"), ("layernorm_zero_centered_gamma", "zero-centred norm weights")):
        if _get(cfg, key):
            out.append(f"model.{key} = {cfg[key]!r}: {why} are not exported{fix}")
    heads, groups = _get(cfg, "num_attention_heads", 1), _get(cfg, "num_query_groups", _get(cfg, "num_attention_heads", 1))
    if groups % tp_size or heads % tp_size:
        out.append(f"model.num_query_groups = {groups} / model.num_attention_heads = {heads}: not divisible by tensor_model_parallel_size = {tp_size}")
    if pp_size > 1 and _get(cfg, "share_embeddings_and_output_weights", False):
        out.append("model.share_embeddings_and_output_weights = true with a pipeline-parallel engine: set model.ppo.trt_llm.reshard = true (a PP=1 engine)")
    return out


def _require_exportable(cfg: Mapping[str, Any], tp_size: int, pp_size: int = 1) -> None:
    problems = export_problems(cfg, tp_size=tp_size, pp_size=pp_size)
    if problems:
        raise ExportError("the model cannot be exported to TensorRT-LLM faithfully:\n  " + "\n  ".join(problems))


def trtllm_config(model_cfg: Mapping[str, Any], *, vocab_size: int, tp_size: int = 1, pp_size: int = 1, dtype: str = "bfloat16", gpus_per_node: int | None = None) -> dict[str, Any]:
    """The keyword arguments of TensorRT-LLM 0.13's ``LLaMAConfig`` for ``model_cfg`` (a NeMo
    model config, or a Hugging Face ``config.json`` dict), with ``attn_bias`` from ``qkv_bias``.

    The keys are those megatron-core 0.10's helper passes (so the engine is the one NeMo would
    build) except ``bias``, replaced by ``attn_bias``/``mlp_bias``. The caller sets ``mapping``.

    Raises:
        ExportError: the model cannot be exported faithfully (:func:`export_problems`).
    """
    cfg = nemo_fields(model_cfg)
    _require_exportable(cfg, tp_size, pp_size)
    if dtype not in DTYPES:
        raise ExportError(f"dtype = {dtype!r}: choose one of {', '.join(DTYPES)}")
    heads = int(cfg["num_attention_heads"])
    rotary_scaling = None
    if _get(cfg, "scale_positional_embedding", False):  # Llama 3.1's RoPE scaling (the constants megatron-core 0.10 implements)
        rotary_scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    elif cfg.get("seq_len_interpolation_factor") is not None:
        rotary_scaling = {"type": "linear", "factor": float(cfg["seq_len_interpolation_factor"])}
    tied = bool(_get(cfg, "share_embeddings_and_output_weights", False))
    return {
        "architecture": ARCHITECTURE,
        "dtype": dtype,
        "logits_dtype": "float32",
        "num_hidden_layers": int(cfg["num_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_get(cfg, "num_query_groups", heads)),
        "head_size": int(_get(cfg, "kv_channels", int(cfg["hidden_size"]) // heads)),
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["ffn_hidden_size"]),
        "norm_epsilon": float(_get(cfg, "layernorm_epsilon", 1e-5)),
        "vocab_size": int(vocab_size),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": int(_get(cfg, "max_position_embeddings", _get(cfg, "encoder_seq_length", 4096))),
        "hidden_act": "silu",
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "share_embedding_table": tied,
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "attn_bias": bool(_get(cfg, "qkv_bias", False)),
        "mlp_bias": False,
        "apply_query_key_layer_scaling": False,
        "rotary_pct": 1.0,
        "rotary_base": float(_get(cfg, "rotary_base", 10000.0)),
        "rotary_scaling": rotary_scaling,
        "moe_num_experts": 0,
        "moe_top_k": 0,
        "world_size": tp_size * pp_size,
        "tp_size": tp_size,
        "pp_size": pp_size,
        "gpus_per_node": gpus_per_node or tp_size,
    }


def engine_weight_shapes(trt_cfg: Mapping[str, Any], *, pp_rank: int = 0) -> dict[str, tuple[int, ...]]:
    """Every weight one rank's engine holds, with its shape, for a :func:`trtllm_config` dict:
    its pipeline stage's layers numbered from 0, the embedding on the first stage, the final
    norm and ``lm_head`` on the last."""
    tp, pp = int(trt_cfg["tp_size"]), int(trt_cfg["pp_size"])
    h, f, d = trt_cfg["hidden_size"], trt_cfg["intermediate_size"], trt_cfg["head_size"]
    q, kv = trt_cfg["num_attention_heads"] * d // tp, trt_cfg["num_key_value_heads"] * d // tp
    rows = math.ceil(trt_cfg["vocab_size"] / tp)
    shapes: dict[str, tuple[int, ...]] = {"transformer.vocab_embedding.weight": (rows, h)} if pp_rank == 0 else {}
    if pp_rank == pp - 1:
        shapes["transformer.ln_f.weight"] = (h,)
        if not trt_cfg["share_embedding_table"]:
            shapes["lm_head.weight"] = (rows, h)
    for i in range(trt_cfg["num_hidden_layers"] // pp):
        p = f"transformer.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "attention.qkv.weight": (q + 2 * kv, h),
            p + "attention.dense.weight": (h, q),
            p + "post_layernorm.weight": (h,),
            p + "mlp.fc.weight": (f // tp, h),
            p + "mlp.gate.weight": (f // tp, h),
            p + "mlp.proj.weight": (h, f // tp),
        })
        if trt_cfg["attn_bias"]:
            shapes[p + "attention.qkv.bias"] = (q + 2 * kv,)
            shapes[p + "attention.dense.bias"] = (h,)  # TensorRT-LLM's dense bias follows the attention's: zeros
    return shapes


def canonical_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Megatron GPT state dict under local-spec names: any wrapper prefix before
    ``decoder.``/``embedding.``/``output_layer.`` (NeMo's ``model.``) removed,
    TransformerEngine's fused-norm names mapped back, ``_extra_state`` entries dropped."""
    out = {}
    for key, value in state_dict.items():
        starts = [key.find(p) for p in _PREFIXES if key.find(p) >= 0]
        if not starts or not isinstance(value, torch.Tensor):
            continue
        out[key[min(starts):]] = value
    return from_te_names(out)


def vocab_shard(full: torch.Tensor, vocab_size: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s engine rows of a whole (Megatron-padded) vocabulary tensor ``[V_pad, H]``:
    the first ``vocab_size`` rows cut in ``ceil(V / tp)``-row shards, the last one zero-padded."""
    if full.shape[0] < vocab_size:
        raise ExportError(f"the vocabulary tensor has {full.shape[0]} rows, fewer than the tokenizer's {vocab_size}")
    rows = math.ceil(vocab_size / tp_size)
    shard = full[tp_rank * rows : min(vocab_size, (tp_rank + 1) * rows)]
    if shard.shape[0] < rows:
        shard = torch.cat([shard, shard.new_zeros(rows - shard.shape[0], *shard.shape[1:])])
    return shard


def engine_weights(state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], *, tp_size: int, tp_rank: int, vocab_size: int,
                   dtype: torch.dtype = torch.bfloat16, pp_size: int = 1, pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """One rank's engine weights (TensorRT-LLM names, shapes of :func:`engine_weight_shapes`).

    Args:
        state_dict: this rank's Megatron GPT state dict: the layers of its pipeline stage
            numbered from 0 (every layer for a PP=1 engine, stages gathered), any names
            :func:`canonical_names` reads; its ``embedding.word_embeddings.weight`` (first stage)
            and ``output_layer.weight`` (last stage) *whole*, every TP rank's rows concatenated.
        pp_size, pp_rank: the engine's pipeline stages and this rank's stage.
        model_cfg: the NeMo model config (or a Hugging Face ``config.json`` dict).
        vocab_size: the tokenizer's vocabulary (Megatron's padding rows are dropped).
        dtype: the engine's weight dtype.

    Returns:
        Contiguous CPU tensors; ``attention.qkv.bias`` from Megatron's ``linear_qkv.bias`` and
        zero ``attention.dense.bias`` when the model has ``qkv_bias``.
    """
    cfg = nemo_fields(model_cfg)
    _require_exportable(cfg, tp_size, pp_size)
    sd = canonical_names(state_dict)
    heads = int(cfg["num_attention_heads"])
    groups, h = int(_get(cfg, "num_query_groups", heads)) // tp_size, int(cfg["hidden_size"])
    per, d = heads // int(_get(cfg, "num_query_groups", heads)), int(_get(cfg, "kv_channels", h // heads))
    qkv_bias = bool(_get(cfg, "qkv_bias", False))

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            field = " (model.qkv_bias = true)" if key.endswith("linear_qkv.bias") else ""
            raise ExportError(f"the Megatron state dict has no {key!r}{field}; is this the model the config describes?")
        return sd[key]

    def split_qkv(t: torch.Tensor) -> torch.Tensor:
        grouped = t.reshape(groups, per + 2, d, *t.shape[1:])  # [G/tp, per+2, D, (H)]
        q, k, v = grouped[:, :per], grouped[:, per], grouped[:, per + 1]
        return torch.cat([q.reshape(-1, *t.shape[1:]), k.reshape(-1, *t.shape[1:]), v.reshape(-1, *t.shape[1:])])  # [q; k; v]

    out = {}
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = vocab_shard(take("embedding.word_embeddings.weight"), vocab_size, tp_size, tp_rank)
    if pp_rank == pp_size - 1:
        out["transformer.ln_f.weight"] = take("decoder.final_layernorm.weight")
        if not _get(cfg, "share_embeddings_and_output_weights", False):
            out["lm_head.weight"] = vocab_shard(take("output_layer.weight"), vocab_size, tp_size, tp_rank)
    for i in range(int(cfg["num_layers"]) // pp_size):
        m, t = f"decoder.layers.{i}.", f"transformer.layers.{i}."
        for unexpected in ("self_attention.linear_proj.bias", "mlp.linear_fc1.bias", "mlp.linear_fc2.bias"):
            if m + unexpected in sd:
                raise ExportError(f"the state dict holds {m + unexpected}: linear biases (model.bias = true) are not exported")
        fc, gate = torch.chunk(take(m + "mlp.linear_fc1.weight"), 2, dim=0)  # Megatron [gate; up] -> engine fc (activated), gate (linear)
        out.update({
            t + "input_layernorm.weight": take(m + "input_layernorm.weight"),
            t + "attention.qkv.weight": split_qkv(take(m + "self_attention.linear_qkv.weight")),
            t + "attention.dense.weight": take(m + "self_attention.linear_proj.weight"),
            t + "post_layernorm.weight": take(m + "pre_mlp_layernorm.weight"),
            t + "mlp.fc.weight": fc,
            t + "mlp.gate.weight": gate,
            t + "mlp.proj.weight": take(m + "mlp.linear_fc2.weight"),
        })
        if qkv_bias:
            out[t + "attention.qkv.bias"] = split_qkv(take(m + "self_attention.linear_qkv.bias"))
            out[t + "attention.dense.bias"] = torch.zeros(h)
        elif m + "self_attention.linear_qkv.bias" in sd:
            raise ExportError(f"the state dict holds {m}self_attention.linear_qkv.bias but model.qkv_bias is false: set it true (Qwen2)")
    return {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in out.items()}


def refit_problems(provided: Mapping[str, int], engine: Mapping[str, int], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Why refitting an engine with ``provided`` weights would not give the trainer's model.

    Args:
        provided: name -> element count of the weights about to be refitted.
        engine: name -> element count of the engine's refittable weights.
        expected: :func:`engine_weight_shapes` of the engine's config.

    Returns:
        One line per problem: a provided weight the engine lacks (NeMo's refit would skip it
        with a log warning: an engine built without ``attn_bias`` loses the QKV bias this way),
        an expected weight the engine has but nobody provides, or a size mismatch.
    """
    out = []
    for name, count in sorted(provided.items()):
        if name not in engine:
            why = " (the engine was built without attention bias: rebuild it with attn_bias, see nemo_guide.aligner.trt_export)" if name.endswith("attention.qkv.bias") else ""
            out.append(f"the engine has no weight {name}{why}")
        elif engine[name] != count:
            out.append(f"{name}: {count} values provided, the engine holds {engine[name]}")
    for name in sorted(set(expected) & set(engine) - set(provided)):
        out.append(f"{name}: held by the engine but not provided")
    return out
