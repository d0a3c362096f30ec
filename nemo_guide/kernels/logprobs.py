"""Token log-probabilities straight from hidden states, without ``[T, V]`` logits.

``fused_logprobs(hidden, weight, targets)`` returns ``log softmax(hidden @ W.T)[t, targets[t]]``
(and optionally the entropy of each row's distribution) in float32. Tokens are processed
in chunks of ``chunk_size``; backward recomputes each chunk's logits, so at most
``[chunk_size, V_local]`` logits exist at any time, forward or backward. With a
``tp_group`` the vocabulary is sharded as in Megatron's column-parallel output layer:
rank ``r`` holds rows ``r*V_local .. (r+1)*V_local - 1`` of the output weight, and three
all-reduces per chunk (max, sum-exp, target logit; plus one for the entropy) give every
rank the same result. The hidden-state gradient is all-reduced like Megatron's
``copy_to_tensor_model_parallel_region``; the weight gradient stays local to the shard.

Layout (STYLE 4): pure per-shard steps below, one ``autograd.Function`` that does the
collectives over an explicit process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# -- pure per-shard steps ----------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def shard_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``hidden @ weight.T`` in ``dtype``. Shape: ``[C, H] x [V_local, H] -> [C, V_local]``."""
    return hidden.to(dtype) @ weight.to(dtype).T


def shard_target_logit(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit of each target if it lies in this shard, else 0.

    Args:
        logits: Shape: ``[C, V_local]``.
        targets: global token ids. Shape: ``[C]``.
        vocab_start: the first global id of this shard.

    Returns:
        ``(target_logit [C], in_shard [C] bool)``.
    """
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(in_shard, picked, torch.zeros_like(picked)), in_shard


def grad_logits_(
    logits: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    targets: torch.Tensor,
    vocab_start: int,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """d(loss)/d(logits) of this shard, computed in place in ``logits`` (returned).

    ``d logp_t / d z = onehot(target) - p``; ``d H / d z = -p * (log p + H)``.
    Shapes: ``logits [C, V_local]``, the rest ``[C]``. Holds at most two ``[C, V_local]``
    buffers (one without entropy).
    """
    logp = logits.sub_(lse.unsqueeze(-1))  # in place: log p
    ent_term = None
    if grad_entropy is not None:
        ent_term = (logp + entropy.unsqueeze(-1)).mul_(-grad_entropy.unsqueeze(-1))  # -(log p + H) * gH
    grad = logp.exp_()  # in place: p
    if ent_term is not None:
        ent_term.mul_(grad)
    grad.mul_(-grad_logprob.unsqueeze(-1))  # -p * g_logp
    if ent_term is not None:
        grad.add_(ent_term)
        del ent_term
    local = targets - vocab_start
    rows = torch.nonzero((local >= 0) & (local < grad.shape[-1])).squeeze(-1)
    grad[rows, local[rows]] += grad_logprob[rows]
    return grad


# -- the one Function with collectives --------------------------------------------------


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, group, chunk_size, with_entropy):
        dtype = _compute_dtype(hidden, weight)
        rank = dist.get_rank(group) if group is not None else 0
        vocab_start = rank * weight.shape[0]
        num_tokens = hidden.shape[0]
        logprob = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
        lse_all = torch.empty_like(logprob)
        entropy = torch.empty_like(logprob) if with_entropy else None
        for start in range(0, num_tokens, chunk_size):
            sl = slice(start, start + chunk_size)
            buf = shard_logits(hidden[sl], weight, dtype)  # the one [C, V_local] buffer
            target_logit, _ = shard_target_logit(buf, targets[sl], vocab_start)
            m = _all_reduce(buf.max(-1).values, dist.ReduceOp.MAX, group)  # [C]
            shifted = buf.sub_(m.unsqueeze(-1))  # in place: z - m
            if with_entropy:
                # sum_j e^s_j * s_j with s = z - m; with S = sum_j e^s_j, H = log S - (sum e^s s) / S
                xs = _all_reduce(shifted.exp().mul_(shifted).sum(-1), dist.ReduceOp.SUM, group)
            sum_exp = _all_reduce(shifted.exp_().sum(-1), dist.ReduceOp.SUM, group)  # [C]
            lse = m + sum_exp.log()
            target_logit = _all_reduce(target_logit, dist.ReduceOp.SUM, group)
            logprob[sl] = target_logit - lse
            lse_all[sl] = lse
            if with_entropy:
                entropy[sl] = sum_exp.log() - xs / sum_exp
            del buf, shifted
        ctx.save_for_backward(hidden, weight, targets, lse_all, *( [entropy] if with_entropy else []))
        ctx.group, ctx.chunk_size, ctx.with_entropy, ctx.vocab_start, ctx.dtype = group, chunk_size, with_entropy, vocab_start, dtype
        if with_entropy:
            return logprob, entropy
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        hidden, weight, targets, lse_all, *rest = ctx.saved_tensors
        entropy_all = rest[0] if ctx.with_entropy else None
        dtype = ctx.dtype
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(lse_all)
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl].to(dtype)
            logits = shard_logits(h, w, dtype)  # recomputed: [C, V_local]
            g = grad_logits_(
                logits,
                lse_all[sl],
                entropy_all[sl] if entropy_all is not None else None,
                targets[sl],
                ctx.vocab_start,
                grad_logprob[sl].to(dtype),
                grad_entropy[sl].to(dtype) if (ctx.with_entropy and grad_entropy is not None) else None,
            )
            if grad_hidden is not None:
                torch.mm(g, w, out=grad_hidden[sl])  # [C, H]
            if grad_weight is not None:
                grad_weight.addmm_(g.T, h)  # [V_local, H], no temporary
            del logits, g
        if grad_hidden is not None:
            # hidden is replicated over the TP group: its gradient is the sum of every shard's part.
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: int = 1024,
    return_entropy: bool = False,
):
    """Log-probabilities of ``targets`` under ``softmax(hidden @ W_full.T)``.

    Args:
        hidden: final hidden states (after the last norm). Shape: ``[T, H]``.
        weight: this rank's contiguous vocabulary shard of the output layer. Shape:
            ``[V/tp, H]`` (``[V, H]`` without ``tp_group``).
        targets: global token ids. Shape: ``[T]``, long.
        tp_group: the tensor-parallel process group, or None for the whole vocabulary.
        chunk_size: tokens per chunk; at most ``[chunk_size, V/tp]`` logits are held.
        return_entropy: also return the entropy of each token's distribution.

    Returns:
        Shape: ``[T]`` float32 (float64 for float64 inputs), or ``(logprobs, entropy)``.
        Differentiable w.r.t. ``hidden`` and ``weight``; identical on every TP rank.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [T, H] and weight [V_local, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [T] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = weight.shape[0] * (dist.get_world_size(tp_group) if tp_group is not None else 1)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must be token ids in [0, {vocab}); got range [{int(targets.min())}, {int(targets.max())}]")
    return _FusedLogprobs.apply(hidden, weight, targets.long(), tp_group, chunk_size, return_entropy)
