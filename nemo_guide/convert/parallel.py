"""Tensor- and pipeline-parallel splits of a Megatron state dict, as pure tensor functions.

Tensor parallel (Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``VocabParallelEmbedding``):

- column-parallel, split on dim 0: ``linear_qkv`` (weight and bias; the per-group
  interleave makes each rank hold ``G / tp`` whole groups), the word embedding and the
  output layer (rank ``r`` holds vocabulary rows ``r*V/tp .. (r+1)*V/tp - 1``);
- ``linear_fc1`` is ``[gate; up]``: each rank holds ``[gate_r; up_r]``, not a contiguous
  slice of the fused tensor;
- row-parallel, split on dim 1: ``linear_proj``, ``linear_fc2``;
- everything else (norms) is replicated.

Pipeline parallel: stage ``s`` of ``pp`` holds layers ``s*n/pp .. (s+1)*n/pp - 1``,
renumbered from 0; the first stage holds the embedding, the last the final norm and the
output layer. With tied embeddings and ``pp > 1`` the last stage holds its own copy of the
embedding as ``output_layer.weight``, as Megatron does.
"""

from __future__ import annotations

import torch

from nemo_guide.convert.mapping import StateDict, from_te_names, layer_index
from nemo_guide.convert.errors import ConvertError
from nemo_guide.convert.shape import ModelShape

_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "embedding.word_embeddings.weight", "output_layer.weight")
_GATED = ("mlp.linear_fc1.weight",)
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def tp_kind(key: str) -> str:
    """``column``, ``gated``, ``row`` or ``replicated`` for a local-spec key."""
    for kind, suffixes in (("column", _COLUMN), ("gated", _GATED), ("row", _ROW)):
        if any(key == s or key.endswith("." + s) for s in suffixes):
            return kind
    return "replicated"


def _chunk(t: torch.Tensor, tp: int, dim: int, key: str) -> tuple[torch.Tensor, ...]:
    if t.shape[dim] % tp:
        raise ConvertError(f"{key}: dim {dim} of size {t.shape[dim]} is not divisible by tensor_model_parallel_size = {tp}")
    return torch.chunk(t, tp, dim=dim)


def shard_tensor(key: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of one full tensor (contiguous, a copy only where needed)."""
    kind = tp_kind(key)
    if tp == 1 or kind == "replicated":
        return t
    if kind == "column":
        return _chunk(t, tp, 0, key)[rank].contiguous()
    if kind == "row":
        return _chunk(t, tp, 1, key)[rank].contiguous()
    gate, up = torch.chunk(t, 2, dim=0)
    return torch.cat([_chunk(gate, tp, 0, key)[rank], _chunk(up, tp, 0, key)[rank]], dim=0)


def unshard_tensor(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` over all ranks' parts (replicated: rank 0's)."""
    kind = tp_kind(key)
    if len(parts) == 1 or kind == "replicated":
        return parts[0]
    if kind == "column":
        return torch.cat(parts, dim=0)
    if kind == "row":
        return torch.cat(parts, dim=1)
    halves = [torch.chunk(p, 2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def shard_tp(full: StateDict, shape: ModelShape, tp: int, rank: int) -> StateDict:
    """Rank ``rank``'s tensor-parallel state dict. Shapes: see the module docstring."""
    shape.check_parallel(tp, 1)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside tensor_model_parallel_size {tp}")
    return {key: shard_tensor(key, t, tp, rank) for key, t in from_te_names(full).items()}


def unshard_tp(shards: list[StateDict]) -> StateDict:
    """Full state dict from every tensor-parallel rank's state dict (in rank order)."""
    shards = [from_te_names(s) for s in shards]
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], start=1):
        if set(s) != set(keys):
            raise ValueError(f"tensor-parallel rank {r} has different keys than rank 0: {sorted(set(s) ^ set(keys))[:5]}")
    return {key: unshard_tensor(key, [s[key] for s in shards]) for key in keys}


def stage_layers(shape: ModelShape, pp: int, stage: int) -> range:
    """Global layer numbers held by pipeline stage ``stage``."""
    shape.check_parallel(1, pp)
    per = shape.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def pipeline_stage(full: StateDict, shape: ModelShape, pp: int, stage: int) -> StateDict:
    """Stage ``stage``'s state dict with its layers renumbered from 0."""
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} is outside pipeline_model_parallel_size {pp}")
    layers = stage_layers(shape, pp, stage)
    first, last = stage == 0, stage == pp - 1
    out: StateDict = {}
    for key, t in from_te_names(full).items():
        i = layer_index(key)
        if i is not None:
            if i in layers:
                out[key.replace(f"decoder.layers.{i}.", f"decoder.layers.{i - layers.start}.", 1)] = t
        elif key == "embedding.word_embeddings.weight":
            if first:
                out[key] = t
            if last and not first and shape.tie_word_embeddings:
                out["output_layer.weight"] = t
        elif key in ("decoder.final_layernorm.weight", "output_layer.weight"):
            if last:
                out[key] = t
        else:
            raise ValueError(f"unexpected key {key!r} in a Megatron GPT state dict")
    return out


def merge_pipeline_stages(stages: list[StateDict], shape: ModelShape) -> StateDict:
    """Inverse of :func:`pipeline_stage` over all stages (in order)."""
    pp = len(stages)
    out: StateDict = {}
    for stage, sd in enumerate(stages):
        start = stage_layers(shape, pp, stage).start
        for key, t in from_te_names(sd).items():
            i = layer_index(key)
            if i is not None:
                out[key.replace(f"decoder.layers.{i}.", f"decoder.layers.{i + start}.", 1)] = t
            elif key == "output_layer.weight" and shape.tie_word_embeddings:
                continue  # the last stage's copy of the tied embedding
            else:
                out[key] = t
    return out
