"""Token log-probabilities straight from hidden states, without ``[T, V]`` logits.

``fused_logprobs(hidden, weight, targets)`` returns ``log softmax(hidden @ W.T)[t, targets[t]]``
(and optionally the entropy of each row's distribution) in float32. Tokens are processed
in chunks of ``chunk_size`` rows, at most ``[chunk_size, V_local]`` logits at a time. By
default (``chunk_size=None``) the tokens are split into the fewest equal chunks that fit a
memory budget (``chunking.chunk_for_budget``, 512 MiB unless ``memory_budget`` says
otherwise); an integer ``chunk_size`` is used as given.

Kept or recomputed: the forward keeps the first chunk's logits and the backward turns them
into that chunk's gradient in place; it recomputes the logits of every other chunk. With one
chunk that is three ``T x V x H`` products in all (forward logits, hidden and weight
gradients), like megatron-core's ``vocab_parallel_cross_entropy``, which keeps its softmax;
with ``n`` chunks, ``3 + (n - 1) / n``. Memory stays at one chunk: the forward makes the
chunks last to first (so the kept one is made last) and the backward walks them first to
last (so the kept one goes first). Without a graph (``no_grad``) the kept logits go when the
call returns. ``recompute=True`` keeps nothing and recomputes every chunk; both ways give the
same values and gradients bit for bit (the same arithmetic on the same logits, the weight
gradient summed over the chunks in the same order).

Per-chunk elementwise work runs over blocks of rows (``chunking.row_blocks``, about
``chunking.BLOCK_BYTES`` = 32 MiB each): the forward's shifted and exponentiated logits live
in one block-sized scratch, so the chunk's logits are intact when the backward needs them,
and the backward's entropy term needs one block, not a second chunk. A row's sum is the same
whichever block holds it (a test checks this against whole-chunk arithmetic), so the blocks
change no result.

With a ``tp_group`` the vocabulary is sharded as in Megatron's column-parallel output layer:
rank ``r`` holds rows ``r*V_local .. (r+1)*V_local - 1`` of the output weight; each rank
reduces its shard to per-token statistics (max, sum-exp, target logit, and the entropy
sum), and three all-reduces over ``[T]`` vectors (four with entropy) combine them, so
every rank gets the same result. The hidden-state gradient is all-reduced like Megatron's
``copy_to_tensor_model_parallel_region``; the weight gradient stays local to the shard.

Layout (STYLE 4): pure per-shard steps below, one ``autograd.Function`` that does the
collectives over an explicit process group. The per-shard steps have two implementations
with one interface (``shard_stats``, ``grad_logits``): pure torch here (the default on
every device), fused Triton kernels in ``logprobs_triton`` (opt-in: ``impl="triton"`` or
``NEMO_GUIDE_LOGPROBS_IMPL=triton``; they never build logits in the forward, so there is
nothing to keep, and their backward always recomputes logit tiles). ``impl="auto"`` stays on
torch until ``benchmarks/logprobs.py`` on a GPU shows the Triton kernels faster; they have
been checked for correctness (in Triton's interpreter on CPU) but never timed.

Host syncs: the forward and backward issue none on their own. Checking that every target
id lies in ``[0, V)`` needs one (a reduction read back to the host), so it runs only with
``debug_checks=True`` or ``NEMO_GUIDE_DEBUG_CHECKS=1``; shape and ``chunk_size`` checks
read metadata only and always run.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nemo_guide.kernels.chunking import DEFAULT_MEMORY_BUDGET, block_rows, chunk_bounds, chunk_rows, row_blocks

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


def shard_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, with_entropy: bool):
    """This shard's softmax statistics of each row; ``logits`` are left as they are.

    With ``m = max_j z_j`` over the shard: ``s = sum_j e^(z_j - m)``,
    ``a = sum_j e^(z_j - m) (z_j - m)`` (only ``with_entropy``) and the target logit
    (0 when the target is in another shard). Shape: ``[C, V_local] -> four [C]`` (``a`` None).
    ``z - m`` and its exponential go through one :func:`row_blocks`-sized scratch.
    """
    target_logit, _ = shard_target_logit(logits, targets, vocab_start)
    m = logits.max(-1).values
    s = torch.empty_like(m)
    a = torch.empty_like(m) if with_entropy else None
    blocks = row_blocks(logits.shape[0], block_rows(logits.shape[1], logits.element_size()))
    scratch = logits.new_empty(max((hi - lo for lo, hi in blocks), default=0), logits.shape[1])
    for lo, hi in blocks:
        shifted = torch.sub(logits[lo:hi], m[lo:hi].unsqueeze(-1), out=scratch[: hi - lo])  # z - m
        if with_entropy:
            a[lo:hi] = shifted.exp().mul_(shifted).sum(-1)
        s[lo:hi] = shifted.exp_().sum(-1)  # in place: e^(z - m)
    return m, s, a, target_logit


def chunked_stats(hidden, weight, targets, vocab_start: int, chunk_size: int, with_entropy: bool, dtype, keep_first: bool):
    """:func:`shard_stats` of all ``T`` rows, ``chunk_size`` rows (one ``[C, V_local]`` buffer) at a
    time, and (``keep_first``) the first chunk's logits, else None.

    The chunks are made last to first, so the first is the one made last: keeping it holds no
    second buffer while the others are made. (Each chunk's statistics are its own, so the
    order changes no value.)
    """
    bounds = chunk_bounds(hidden.shape[0], chunk_size)
    parts, first = [], None
    for lo, hi in reversed(bounds):
        logits = shard_logits(hidden[lo:hi], weight, dtype)  # [C, V_local]
        parts.append(shard_stats(logits, targets[lo:hi], vocab_start, with_entropy))
        if keep_first and lo == 0:
            first = logits
        del logits  # before the next chunk's buffer is made
    if not parts:  # T = 0
        empty = torch.empty(0, dtype=dtype, device=hidden.device)
        return (empty, empty, (empty if with_entropy else None), empty), None
    m, s, a, t = zip(*reversed(parts), strict=True)
    return (torch.cat(m), torch.cat(s), (torch.cat(a) if with_entropy else None), torch.cat(t)), first


def torch_shard_stats(hidden, weight, targets, vocab_start: int, chunk_size: int, with_entropy: bool, dtype):
    """:func:`shard_stats` of all ``T`` rows, ``chunk_size`` rows (one ``[C, V_local]`` buffer) at a time."""
    return chunked_stats(hidden, weight, targets, vocab_start, chunk_size, with_entropy, dtype, keep_first=False)[0]


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
    Shapes: ``logits [C, V_local]``, the rest ``[C]``. Elementwise over :func:`row_blocks`;
    with entropy one block-sized temporary besides ``logits``.
    """
    for lo, hi in row_blocks(logits.shape[0], block_rows(logits.shape[1], logits.element_size())):
        logp = logits[lo:hi].sub_(lse[lo:hi].unsqueeze(-1))  # in place: log p
        ent_term = None
        if grad_entropy is not None:
            ent_term = (logp + entropy[lo:hi].unsqueeze(-1)).mul_(-grad_entropy[lo:hi].unsqueeze(-1))  # -(log p + H) * gH
        p = logp.exp_()  # in place: p
        if ent_term is not None:
            ent_term.mul_(p)
        p.mul_(-grad_logprob[lo:hi].unsqueeze(-1))  # -p * g_logp
        if ent_term is not None:
            p.add_(ent_term)
            del ent_term
    grad = logits
    # + g_logp at each row's target column; rows whose target is in another shard add 0 at a
    # clamped column (a scatter, not indexing with nonzero(), which would sync with the host)
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < grad.shape[-1])
    add = torch.where(in_shard, grad_logprob, torch.zeros_like(grad_logprob))
    grad.scatter_add_(-1, local.clamp(0, grad.shape[-1] - 1).unsqueeze(-1), add.unsqueeze(-1).to(grad.dtype))
    return grad


def torch_grad_logits(hidden, weight, targets, vocab_start, lse, entropy, grad_logprob, grad_entropy, dtype):
    """``[C, V_local]`` gradient of the loss w.r.t. this chunk's logits (recomputed)."""
    return grad_logits_(shard_logits(hidden, weight, dtype), lse, entropy, targets, vocab_start, grad_logprob, grad_entropy)


# -- the one Function with collectives --------------------------------------------------


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def combine_stats(m, s, a, target_logit, group):
    """Whole-vocabulary ``(lse, logprob, entropy | None)`` from every shard's statistics.

    ``M = max_r m_r``; each shard's sums are rescaled by ``e^(m_r - M)`` and summed:
    ``S = sum_j e^(z_j - M)``, ``A = sum_j e^(z_j - M)(z_j - M)``; then
    ``lse = M + log S``, ``log p(target) = z_target - lse``, ``H = log S - A / S``.
    All shapes ``[T]``; three all-reduces (four with entropy).
    """
    big_m = _all_reduce(m.clone(), dist.ReduceOp.MAX, group)
    scale = torch.exp(m - big_m)
    total_s = _all_reduce(s * scale, dist.ReduceOp.SUM, group)
    target_logit = _all_reduce(target_logit.clone(), dist.ReduceOp.SUM, group)
    log_s = total_s.log()
    lse = big_m + log_s
    entropy = None
    if a is not None:
        total_a = _all_reduce(scale * (a + (m - big_m) * s), dist.ReduceOp.SUM, group)
        entropy = log_s - total_a / total_s
    return lse, target_logit - lse, entropy


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, group, chunk, with_entropy, impl, keep):
        """``chunk``: rows per chunk (resolved); ``keep``: keep one chunk's logits for the backward."""
        dtype = _compute_dtype(hidden, weight)
        rank = dist.get_rank(group) if group is not None else 0
        vocab_start = rank * weight.shape[0]
        ctx.kept = None  # the first chunk's logits (shard_stats leaves them intact), for the backward
        if keep and impl is _TorchImpl:
            stats, ctx.kept = chunked_stats(hidden, weight, targets, vocab_start, chunk, with_entropy, dtype, keep_first=True)
        else:
            stats = impl.shard_stats(hidden, weight, targets, vocab_start, chunk, with_entropy, dtype)
        lse, logprob, entropy = combine_stats(*stats, group)
        ctx.save_for_backward(hidden, weight, targets, lse, *([entropy] if with_entropy else []))
        ctx.group, ctx.chunk, ctx.with_entropy, ctx.vocab_start, ctx.dtype, ctx.impl = group, chunk, with_entropy, vocab_start, dtype, impl
        if with_entropy:
            return logprob, entropy
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        hidden, weight, targets, lse_all, *rest = ctx.saved_tensors
        entropy_all = rest[0] if ctx.with_entropy else None
        dtype = ctx.dtype
        # the kept logits become the gradient in place: a second backward through this graph
        # (retain_graph=True) finds none and recomputes, to the same values
        kept, ctx.kept = ctx.kept, None
        # every row of grad_hidden is written by one chunk's mm; grad_weight is created by the
        # first chunk's product (no zero-filled [V/tp, H] pass) and accumulated by the rest
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(lse_all)
        if not ctx.with_entropy:
            grad_entropy = None
        w = weight.to(dtype)
        for lo, hi in chunk_bounds(hidden.shape[0], ctx.chunk):
            h = hidden[lo:hi].to(dtype)
            lse, ent, y = lse_all[lo:hi], (entropy_all[lo:hi] if entropy_all is not None else None), targets[lo:hi]
            g_lp, g_ent = grad_logprob[lo:hi].to(dtype), (grad_entropy[lo:hi].to(dtype) if grad_entropy is not None else None)
            if kept is not None:  # the first chunk: its logits from the forward, used up here
                g, kept = grad_logits_(kept, lse, ent, y, ctx.vocab_start, g_lp, g_ent), None
            else:  # [C, V_local] in dtype; logits recomputed inside from the raw inputs
                g = ctx.impl.grad_logits(hidden[lo:hi], weight, y, ctx.vocab_start, lse, ent, g_lp, g_ent, dtype)
            if grad_hidden is not None:
                torch.mm(g, w, out=grad_hidden[lo:hi])  # [C, H]
            if ctx.needs_input_grad[1]:
                if grad_weight is None:
                    grad_weight = g.T @ h  # [V_local, H]
                else:
                    grad_weight.addmm_(g.T, h)  # no temporary
            del g
        if grad_hidden is not None:
            # hidden is replicated over the TP group: its gradient is the sum of every shard's part.
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


class _TorchImpl:
    """Pure torch: chunked matmuls, one ``[C, V_local]`` buffer (the first chunk's kept from forward to backward)."""

    name = "torch"
    shard_stats = staticmethod(torch_shard_stats)
    grad_logits = staticmethod(torch_grad_logits)


IMPLS = ("auto", "torch", "triton")
IMPL_ENV = "NEMO_GUIDE_LOGPROBS_IMPL"
DEBUG_ENV = "NEMO_GUIDE_DEBUG_CHECKS"


def _pick_impl(impl: str, dtype: torch.dtype):
    """The per-shard implementation for ``impl``; ``auto`` is torch on every device.

    ``auto`` follows ``NEMO_GUIDE_LOGPROBS_IMPL`` when it is set. It does not pick Triton on
    CUDA: that waits for a GPU measurement (``benchmarks/logprobs.py``) showing it faster.
    """
    choice = os.environ.get(IMPL_ENV, impl) if impl == "auto" else impl
    if choice not in IMPLS:
        raise ValueError(f"impl = {choice!r}: choose one of {', '.join(IMPLS)} (also settable with {IMPL_ENV})")
    if choice in ("auto", "torch"):
        return _TorchImpl
    from nemo_guide.kernels import logprobs_triton  # raises an actionable ImportError without triton

    if dtype == torch.float64:
        raise ValueError("the triton path computes in float32; use impl='torch' for float64 inputs")
    return logprobs_triton.TritonImpl


def _debug_checks_on(debug_checks: bool | None) -> bool:
    if debug_checks is not None:
        return debug_checks
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def _check_target_range(targets: torch.Tensor, vocab: int) -> None:
    """Raise if a target id is outside ``[0, vocab)``; one host sync (two more to report a failure)."""
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"targets must be token ids in [0, {vocab}); got range [{int(targets.min())}, {int(targets.max())}]")


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    return_entropy: bool = False,
    recompute: bool = False,
    impl: str = "auto",
    debug_checks: bool | None = None,
):
    """Log-probabilities of ``targets`` under ``softmax(hidden @ W_full.T)``.

    Args:
        hidden: final hidden states (after the last norm). Shape: ``[T, H]``.
        weight: this rank's contiguous vocabulary shard of the output layer. Shape:
            ``[V/tp, H]`` (``[V, H]`` without ``tp_group``).
        targets: global token ids. Shape: ``[T]``, long.
        tp_group: the tensor-parallel process group, or None for the whole vocabulary.
        chunk_size: tokens per chunk; at most ``[chunk_size, V/tp]`` logits are held. None
            (default): ``T`` in the fewest equal chunks that fit ``memory_budget``
            (``chunking.chunk_for_budget``).
        memory_budget: bytes of chunk-sized buffers when ``chunk_size`` is None (512 MiB
            by default; at ``V/tp = 151936`` in float32 that is 771 tokens a chunk).
        return_entropy: also return the entropy of each token's distribution.
        recompute: keep no logits between forward and backward (the default keeps the
            first chunk's, which saves the backward its ``C x V/tp x H`` product: with one
            chunk the backward recomputes nothing). Same values and gradients either way;
            set it when many graphs are held before one backward, each holding a chunk.
        impl: ``torch`` (chunked matmuls, any device), ``triton`` (fused GPU kernels: the
            forward never builds logits, the backward one ``[chunk_size, V/tp]`` gradient
            buffer at a time; not timed on a GPU yet) or ``auto``: torch on every device,
            unless ``NEMO_GUIDE_LOGPROBS_IMPL`` names another.
        debug_checks: also check that every target id lies in ``[0, V)``, which costs a
            host sync per call. None (default): on when ``NEMO_GUIDE_DEBUG_CHECKS=1``.
            Without the check an out-of-range id is not detected: it is treated as a
            target in no shard (logit 0), and its log-prob is meaningless.

    Returns:
        Shape: ``[T]`` float32 (float64 for float64 inputs), or ``(logprobs, entropy)``.
        Differentiable w.r.t. ``hidden`` and ``weight``; identical on every TP rank.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [T, H] and weight [V_local, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [T] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None: chosen from memory_budget), got {chunk_size}")
    if chunk_size is None and memory_budget < 1:
        raise ValueError(f"memory_budget must be >= 1 byte (default {DEFAULT_MEMORY_BUDGET}), got {memory_budget}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if _debug_checks_on(debug_checks):
        _check_target_range(targets, weight.shape[0] * (dist.get_world_size(tp_group) if tp_group is not None else 1))
    dtype = _compute_dtype(hidden, weight)
    chosen = _pick_impl(impl, dtype)
    chunk = chunk_rows(hidden.shape[0], chunk_size, weight.shape[0], dtype, memory_budget)
    # without a graph (no_grad, as for old log-probs) the kept chunk goes with the call's context
    return _FusedLogprobs.apply(hidden, weight, targets.long(), tp_group, chunk, return_entropy, chosen, not recompute)
