"""The architecture of a Qwen2 or Llama checkpoint, read from its Hugging Face ``config.json``.

One frozen dataclass that every weight map and the Megatron actor read, so that the
two never disagree on head counts or which biases exist. Pure Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_guide.convert.errors import ConvertError

FAMILIES = ("qwen2", "llama", "mistral")

# Megatron-core 0.10's RoPE knows one scaling: Llama 3.1's, with these constants.
_LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelShape:
    """Decoder-only transformer with RMSNorm, SwiGLU, RoPE and grouped-query attention."""

    family: str
    """``qwen2``, ``llama`` or ``mistral`` (Llama layout)."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads (Megatron's ``num_query_groups``)."""
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_llama3_scaling: bool
    """Llama 3.1 RoPE frequency scaling (factor 8, low 1, high 4, original 8192)."""
    qkv_bias: bool
    """Biases on the q/k/v projections (Qwen2 always has them; Llama and Mistral never do here)."""
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads = {self.num_heads} is not a multiple of num_key_value_heads = {self.num_kv_heads}")
        if problems:
            raise ConvertError("invalid model shape: " + "; ".join(problems))

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise ``ValueError`` naming each size that ``tp``/``pp`` does not divide."""
        problems = []
        if tp < 1 or pp < 1:
            problems.append(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp}, pp={pp}")
        else:
            for name, value in (("num_key_value_heads", self.num_kv_heads), ("num_attention_heads", self.num_heads),
                                ("intermediate_size", self.ffn_hidden_size), ("vocab_size", self.vocab_size)):
                if value % tp:
                    problems.append(f"{name} = {value} is not divisible by tensor_model_parallel_size = {tp}")
            if self.num_layers % pp:
                problems.append(f"num_hidden_layers = {self.num_layers} is not divisible by pipeline_model_parallel_size = {pp}")
        if problems:
            raise ConvertError("model and parallel layout do not fit: " + "; ".join(problems) + "; choose sizes that divide them")


def _rope(config: dict, source: str) -> tuple[float, bool]:
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, False
    if kind == "llama3":
        got = {k: float(params.get(k, -1)) for k in _LLAMA3_SCALING}
        if got != _LLAMA3_SCALING:
            raise ConvertError(f"{source}: rope scaling {got} differs from Llama 3.1's {_LLAMA3_SCALING}, "
                             "the only scaling megatron-core 0.10 implements; use a checkpoint with those constants")
        return theta, True
    raise ConvertError(f"{source}: rope_type {kind!r} is not supported (only 'default' and Llama 3.1's 'llama3')")


def shape_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """Read a Hugging Face ``config.json`` dict of a Qwen2, Llama or Mistral model.

    Raises ``ValueError`` naming ``source`` and the field for anything the Megatron
    mapping does not cover (sliding windows, MLP biases, other activations).
    """
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ConvertError(f"{source}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    problems = []
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in config]
    if missing:
        raise ConvertError(f"{source}: missing field(s) {', '.join(missing)}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act = {config['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if family != "qwen2" and config.get("attention_bias"):
        problems.append("attention_bias = true: a bias on o_proj without MLP biases has no megatron-core 0.10 equivalent")
    if config.get("mlp_bias"):
        problems.append("mlp_bias = true: MLP biases are not supported")
    if config.get("use_sliding_window") or (family == "mistral" and config.get("sliding_window")):
        problems.append("sliding-window attention is not supported by the Megatron mapping; set use_sliding_window=false/sliding_window=null")
    if problems:
        raise ConvertError(f"{source}: " + "; ".join(problems))
    heads = int(config["num_attention_heads"])
    theta, llama3 = _rope(config, source)
    return ModelShape(
        family=family,
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        ffn_hidden_size=int(config["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_llama3_scaling=llama3,
        qkv_bias=family == "qwen2",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def read_hf_shape(model_dir: str | Path) -> tuple[ModelShape, dict]:
    """``(shape, raw config dict)`` of the Hugging Face model directory ``model_dir``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; point at a Hugging Face model directory")
    config = json.loads(path.read_text())
    return shape_from_hf_config(config, source=str(path)), config
