"""Hugging Face <-> Megatron-core state dicts for Qwen2 / Llama, as pure tensor functions.

Megatron layout (``GPTModel`` with the local layer spec; the TransformerEngine spec folds
the two pre-norms into the following linear, see :func:`to_te_names`):

- ``linear_qkv``: q, k and v fused and *interleaved per query group*: for each of the
  ``G = num_kv_heads`` groups, the group's ``heads_per_group`` query heads, then its key
  head, then its value head. Shape: ``[G * (heads_per_group + 2) * head_dim, H]``. A
  contiguous split over tensor-parallel ranks then hands each rank whole groups.
- ``linear_fc1``: ``[gate; up]``. Shape: ``[2 * F, H]``; SwiGLU is ``silu(gate) * up``.
- ``linear_proj`` = ``o_proj``, ``linear_fc2`` = ``down_proj``, norms one to one.
- ``output_layer.weight`` only for untied embeddings.

Every function copies nothing it does not have to and never changes values: HF ->
Megatron -> HF is bit-exact (a test checks ``torch.equal``).
"""

from __future__ import annotations

import re

import torch

from nemo_guide.convert.errors import ConvertError
from nemo_guide.convert.shape import ModelShape

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

_HF_LAYER = "model.layers.{i}."
_MG_LAYER = "decoder.layers.{i}."

# one-to-one per-layer names: Megatron (local spec) suffix -> HF suffix
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


# -- fused tensors --------------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, shape: ModelShape) -> Tensor:
    """Interleave q/k/v per query group.

    Args:
        q: Shape: ``[num_heads * D, ...]`` (a weight ``[., H]`` or a bias ``[.]``).
        k, v: Shape: ``[G * D, ...]``.

    Returns:
        Shape: ``[G * (heads_per_group + 2) * D, ...]``.
    """
    g, d, per = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
    rest = q.shape[1:]
    q = q.reshape(g, per * d, *rest)  # [G, per*D, ...]
    k = k.reshape(g, d, *rest)  # [G, D, ...]
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (per + 2) * d, *rest)


def split_qkv(qkv: Tensor, shape: ModelShape) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`. Shape: ``[G * (per + 2) * D, ...] -> q, k, v``."""
    g, d, per = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)  # [G, (per+2)*D, ...]
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return q.reshape(g * per * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """``[F, H], [F, H] -> [2F, H]`` (gate first)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """``[2F, H] -> ([F, H], [F, H])``."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


# -- whole state dicts ------------------------------------------------------------------


def _take(sd: StateDict, key: str, source: str) -> Tensor:
    try:
        return sd[key]
    except KeyError:
        raise ConvertError(f"{source} has no tensor {key!r}; is it a checkpoint of this architecture?") from None


def hf_to_megatron(hf: StateDict, shape: ModelShape, source: str = "the Hugging Face state dict") -> StateDict:
    """Map a full (unsharded) HF state dict to Megatron local-spec names and layouts.

    Extra HF tensors (rotary caches) are ignored; a missing one raises ``KeyError`` naming it.
    """
    out: StateDict = {"embedding.word_embeddings.weight": _take(hf, "model.embed_tokens.weight", source)}
    for i in range(shape.num_layers):
        h, m = _HF_LAYER.format(i=i), _MG_LAYER.format(i=i)
        for mg_name, hf_name in _LAYER_RENAMES.items():
            out[m + mg_name] = _take(hf, h + hf_name, source)
        attn = h + "self_attn."
        q, k, v = (_take(hf, f"{attn}{x}_proj.weight", source) for x in "qkv")
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, shape)
        if shape.qkv_bias:
            qb, kb, vb = (_take(hf, f"{attn}{x}_proj.bias", source) for x in "qkv")
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(qb, kb, vb, shape)
        gate, up = (_take(hf, f"{h}mlp.{x}_proj.weight", source) for x in ("gate", "up"))
        out[m + "mlp.linear_fc1.weight"] = fuse_gate_up(gate, up)
    out["decoder.final_layernorm.weight"] = _take(hf, "model.norm.weight", source)
    if not shape.tie_word_embeddings:
        out["output_layer.weight"] = _take(hf, "lm_head.weight", source)
    return out


def megatron_to_hf(mg: StateDict, shape: ModelShape, source: str = "the Megatron state dict") -> StateDict:
    """Inverse of :func:`hf_to_megatron` (accepts local or TransformerEngine names)."""
    mg = from_te_names(mg)
    out: StateDict = {"model.embed_tokens.weight": _take(mg, "embedding.word_embeddings.weight", source)}
    for i in range(shape.num_layers):
        h, m = _HF_LAYER.format(i=i), _MG_LAYER.format(i=i)
        for mg_name, hf_name in _LAYER_RENAMES.items():
            out[h + hf_name] = _take(mg, m + mg_name, source)
        q, k, v = split_qkv(_take(mg, m + "self_attention.linear_qkv.weight", source), shape)
        out.update({f"{h}self_attn.q_proj.weight": q, f"{h}self_attn.k_proj.weight": k, f"{h}self_attn.v_proj.weight": v})
        if shape.qkv_bias:
            qb, kb, vb = split_qkv(_take(mg, m + "self_attention.linear_qkv.bias", source), shape)
            out.update({f"{h}self_attn.q_proj.bias": qb, f"{h}self_attn.k_proj.bias": kb, f"{h}self_attn.v_proj.bias": vb})
        gate, up = split_gate_up(_take(mg, m + "mlp.linear_fc1.weight", source))
        out.update({f"{h}mlp.gate_proj.weight": gate, f"{h}mlp.up_proj.weight": up})
    out["model.norm.weight"] = _take(mg, "decoder.final_layernorm.weight", source)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = _take(mg, "output_layer.weight", source)
    return out


def _rename_suffixes(mg: StateDict, renames: dict[str, str]) -> StateDict:
    out = {}
    for key, value in mg.items():
        for old, new in renames.items():
            if key.endswith("." + old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


def to_te_names(mg: StateDict) -> StateDict:
    """Local-spec names -> TransformerEngine-spec names (pre-norms fused into the linears)."""
    return _rename_suffixes(mg, _TE_RENAMES)


def from_te_names(mg: StateDict) -> StateDict:
    """TransformerEngine-spec names -> local-spec names; ``_extra_state`` entries are dropped."""
    kept = {k: v for k, v in mg.items() if not k.endswith("._extra_state")}
    return _rename_suffixes(kept, {te: local for local, te in _TE_RENAMES.items()})


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def layer_index(key: str) -> int | None:
    """The layer number of a ``decoder.layers.{i}.…`` key, else None."""
    match = _LAYER_KEY.match(key)
    return int(match.group(1)) if match else None
