"""Triton kernels for ``fused_logprobs`` (the opt-in GPU path, ``impl="triton"``; the one guarded import of triton).

Same two per-shard steps as the torch path, with the same meaning:

- ``shard_stats``: one kernel over ``[BLOCK_T]`` token tiles; each program walks the
  shard's vocabulary in ``[BLOCK_T, BLOCK_V]`` logit tiles computed with ``tl.dot`` over
  ``BLOCK_H`` slices and folds them into running (online-softmax) statistics: max ``m``,
  ``s = sum e^(z - m)``, ``a = sum e^(z - m)(z - m)`` and the target logit. No logits are
  written to memory: the forward holds ``O(T)`` floats besides its inputs.
- ``grad_logits``: one kernel over ``[BLOCK_T, BLOCK_V]`` tiles of a chunk that recomputes
  the logits tile and writes ``d loss / d z`` into the chunk's ``[C, V_local]`` buffer; the
  caller turns it into hidden/weight gradients with two matmuls.

Accumulation is float32 (IEEE products for float32 inputs, native bf16/fp16 tensor-core
products otherwise; see ``_prepare`` for the interpreter). Correctness tests run these kernels on CPU under
``TRITON_INTERPRET=1`` (set before this module is imported). They have not been timed on a
GPU yet, so ``fused_logprobs(impl="auto")`` does not pick them (see ``benchmarks/logprobs.py``).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("fused_logprobs(impl='triton') needs triton: pip install -e '.[triton]' (or use impl='torch')") from exc

_NEG = -1.0e30  # a finite "-inf": keeps 0 * (z - m) at 0 for masked entries


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_ht, stride_wv,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + tl.arange(0, BLOCK_H)
        k_ok = k < H
        hb = tl.load(h_ptr + rows[:, None] * stride_ht + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(hb.to(tl.float32), tl.trans(wb.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(hb, tl.trans(wb))
    return acc


@triton.jit
def _stats_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, a_ptr, t_ptr, T, V, H, vocab_start, stride_ht, stride_wv,
                  BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  WITH_ENTROPY: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    local = tl.load(tgt_ptr + rows, mask=row_ok, other=0) - vocab_start  # [BLOCK_T]
    m = tl.full((BLOCK_T,), _NEG, dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    a = tl.zeros((BLOCK_T,), dtype=tl.float32)
    target = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_ht, stride_wv, BLOCK_T, BLOCK_V, BLOCK_H, IEEE)
        z = tl.where(col_ok[None, :], z, _NEG)
        target += tl.sum(tl.where((cols[None, :] == local[:, None]) & col_ok[None, :], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        shifted = z - m_new[:, None]
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        if WITH_ENTROPY:
            # re-base the running sum of e^(z - m)(z - m) from m to m_new, then add this tile
            a = scale * (a + (m - m_new) * s) + tl.sum(e * shifted, axis=1)
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    tl.store(t_ptr + rows, target, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(a_ptr + rows, a, mask=row_ok)


@triton.jit
def _grad_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, out_ptr, T, V, H, vocab_start,
                 stride_ht, stride_wv, stride_ot,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 WITH_ENTROPY: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    col_ok = cols < V
    z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_ht, stride_wv, BLOCK_T, BLOCK_V, BLOCK_H, IEEE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    local = tl.load(tgt_ptr + rows, mask=row_ok, other=0) - vocab_start
    logp = z - lse[:, None]
    p = tl.exp(logp)
    grad = tl.where(cols[None, :] == local[:, None], g_lp[:, None], 0.0) - p * g_lp[:, None]
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        grad -= p * (logp + ent[:, None]) * g_ent[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], grad, mask=row_ok[:, None] & col_ok[None, :])


def _blocks(hidden_size: int) -> tuple[int, int, int]:
    block_h = min(64, max(16, triton.next_power_of_2(hidden_size)))
    return 32, 64, block_h


def _prepare(hidden: torch.Tensor, weight: torch.Tensor):
    """Contiguous inputs of one dtype, and whether to multiply in IEEE float32.

    Float32 inputs always do; bf16/fp16 use tensor-core products on GPUs, but in Triton's
    interpreter (CPU tests) ``tl.dot`` of bf16 tiles is wrong, so there the tiles are
    upcast to float32 too.
    """
    if hidden.dtype != weight.dtype:
        weight = weight.to(hidden.dtype)
    ieee = hidden.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    return hidden.contiguous(), weight.contiguous(), ieee


def triton_shard_stats(hidden, weight, targets, vocab_start: int, chunk_size: int, with_entropy: bool, dtype):
    """Per-row ``(m, s, a | None, target_logit)`` of this shard (``chunk_size`` is not needed)."""
    h, w, ieee = _prepare(hidden, weight)
    t, v = h.shape[0], w.shape[0]
    out = [torch.empty(t, dtype=torch.float32, device=h.device) for _ in range(4)]
    m, s, a, target = out
    if t:
        bt, bv, bh = _blocks(h.shape[1])
        _stats_kernel[(triton.cdiv(t, bt),)](h, w, targets.contiguous(), m, s, a, target, t, v, h.shape[1], vocab_start,
                                              h.stride(0), w.stride(0), BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh,
                                              WITH_ENTROPY=with_entropy, IEEE=ieee)
    return m.to(dtype), s.to(dtype), (a.to(dtype) if with_entropy else None), target.to(dtype)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def triton_grad_logits(hidden, weight, targets, vocab_start, lse, entropy, grad_logprob, grad_entropy, dtype):
    """``[C, V_local]`` gradient w.r.t. this chunk's logits, from recomputed logit tiles."""
    h, w, ieee = _prepare(hidden, weight)
    t, v = h.shape[0], w.shape[0]
    out = torch.empty(t, v, dtype=torch.float32, device=h.device)
    if t:
        bt, bv, bh = _blocks(h.shape[1])
        with_entropy = grad_entropy is not None
        ent = _f32(entropy) if with_entropy else lse
        g_ent = _f32(grad_entropy) if with_entropy else lse
        _grad_kernel[(triton.cdiv(t, bt), triton.cdiv(v, bv))](
            h, w, targets.contiguous(), _f32(lse), ent, _f32(grad_logprob), g_ent, out, t, v, h.shape[1], vocab_start,
            h.stride(0), w.stride(0), out.stride(0), BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, WITH_ENTROPY=with_entropy, IEEE=ieee,
        )
    return out.to(dtype)


class TritonImpl:
    """Fused Triton kernels (see the module docstring)."""

    name = "triton"
    shard_stats = staticmethod(triton_shard_stats)
    grad_logits = staticmethod(triton_grad_logits)
