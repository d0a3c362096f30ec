"""What TensorRT-LLM 0.13's Llama graph computes, in plain float64 torch, from engine weights.

A reference for the export's weight dicts (``nemo_guide.aligner.trt_export.engine_weights``)
where no engine can be built (CPU): written from TensorRT-LLM's model definition (``LLaMAForCausalLM``
with ``attn_bias``: ``Attention`` with a bias on ``qkv`` and, by default, on ``dense``; RMSNorm,
``rope_gpt_neox``, grouped-query attention, ``GatedMLP`` = ``proj(act(fc(x)) * gate(x))``), per TP
rank with the row-parallel partial sums added as its all-reduce does. Used by
``tests/test_trt_export.py`` and the NeMo-Aligner tier's ``trt_weights`` worker.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """rope_gpt_neox on ``x [T, heads, D]`` (rotate-half, positions 0..T-1)."""
    t, d = x.shape[0], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :], torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def engine_graph_logits(ranks: list[dict], cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """What TensorRT-LLM's Llama graph computes from each TP rank's weights: column-parallel
    qkv/fc/gate, row-parallel dense/proj whose partial outputs are summed (its all-reduce) before
    the (replicated) dense bias, vocabulary-parallel embedding and lm_head. ``tokens [T]`` -> ``[T, V]``."""
    tp, d, eps = cfg["tp_size"], cfg["head_size"], cfg["norm_epsilon"]
    heads, kv = cfg["num_attention_heads"] // tp, cfg["num_key_value_heads"] // tp
    w = [{k: v.double() for k, v in r.items()} for r in ranks]
    norm = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g  # noqa: E731
    x = torch.cat([r["transformer.vocab_embedding.weight"] for r in w])[tokens]  # [T, H]
    t = tokens.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        h = norm(x, w[0][p + "input_layernorm.weight"])
        out = 0
        for r in w:
            qkv = h @ r[p + "attention.qkv.weight"].T + (r[p + "attention.qkv.bias"] if cfg["attn_bias"] else 0)
            q, k, v = torch.split(qkv, [heads * d, kv * d, kv * d], -1)
            q, k, v = _rope(q.view(t, heads, d), cfg["rotary_base"]), _rope(k.view(t, kv, d), cfg["rotary_base"]), v.view(t, kv, d)
            k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)  # [T, heads, D]
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
            att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = out + torch.einsum("hqk,khd->qhd", att, v).reshape(t, -1) @ r[p + "attention.dense.weight"].T
        x = x + out + (w[0][p + "attention.dense.bias"] if cfg["attn_bias"] else 0)
        h = norm(x, w[0][p + "post_layernorm.weight"])
        x = x + sum((F.silu(h @ r[p + "mlp.fc.weight"].T) * (h @ r[p + "mlp.gate.weight"].T)) @ r[p + "mlp.proj.weight"].T for r in w)
    h = norm(x, w[0]["transformer.ln_f.weight"])
    return torch.cat([h @ r["lm_head.weight"].T for r in w], -1)[:, : cfg["vocab_size"]]
