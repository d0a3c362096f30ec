"""Chunk and row-block sizes of ``fused_logprobs`` (:mod:`nemo_guide.kernels.logprobs`): pure arithmetic.

A chunk is ``C`` token rows whose ``[C, V_local]`` logits exist at once; its elementwise work
runs over row blocks of about ``BLOCK_BYTES`` (one block-sized scratch instead of a second
chunk). ``chunk_size=None`` takes ``C`` from a memory budget (:func:`chunk_for_budget`).
"""

from __future__ import annotations

import math

import torch

DEFAULT_MEMORY_BUDGET = 512 * 2**20
"""Bytes of chunk-sized buffers ``chunk_size=None`` allows (see :func:`chunk_for_budget`)."""
BLOCK_BYTES = 32 * 2**20
"""About this many bytes per row block of elementwise work (see :func:`block_rows`). Smaller
blocks stay in cache on one CPU thread, but every block is one more parallel region (or
kernel launch) per elementwise op, which costs more than the cache gains on a loaded
2-core machine and on a GPU."""

# -- chunk and block sizes (pure) ----------------------------------------------------------


def block_rows(vocab_shard: int, itemsize: int) -> int:
    """Rows per block of elementwise work: ``BLOCK_BYTES`` of ``[rows, V_local]``, at least 2."""
    return max(2, BLOCK_BYTES // max(1, vocab_shard * itemsize))


def row_blocks(rows: int, block: int) -> list[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(rows)`` in blocks of ``block`` rows.

    A one-row remainder joins the block before it, so a chunk of several rows is never
    reduced one row at a time: torch sums a single row with a two-pass split over threads,
    which rounds differently from the row-parallel sum of a multi-row tensor.
    """
    if block < 2:
        raise ValueError(f"block = {block}: must be >= 2 rows")
    edges = [*range(0, rows, block), rows]
    if len(edges) > 2 and edges[-1] - edges[-2] == 1:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:], strict=True)) if rows else []


def chunk_for_budget(vocab_shard: int, dtype: torch.dtype, budget: int) -> int:
    """The largest chunk (tokens) whose buffers fit in ``budget`` bytes.

    One chunk holds ``C`` rows of logits ``[C, V_local]`` in ``dtype`` (the compute dtype:
    float32, or float64 for float64 inputs), which the backward turns into the gradient in
    place, plus at most two row blocks of scratch, each ``min(C, B + 1)`` rows
    (``B = block_rows(V_local, itemsize)``, one more for a merged remainder). With
    ``R = floor(budget / (V_local * itemsize))`` rows in the budget that is
    ``C = max(R - 2 * (B + 1), floor(R / 3), 1)``: the first term when the chunk is longer
    than a block, the second when it is not. A budget below one row and its scratch is
    exceeded (``C = 1``), not refused. Not counted: the weight-sized buffers (the weight
    gradient, float32 copies of a 16-bit weight) and ``[T, H]``/``[T]`` ones, which do not
    depend on the chunk.

    Example: ``V_local = 151936``, float32 (607,744 bytes a row), 512 MiB: ``R = 883``;
    32 MiB blocks are ``B = 55`` rows, so ``C = 883 - 112 = 771``.
    """
    if vocab_shard < 1 or budget < 1:
        raise ValueError(f"chunk_for_budget(vocab_shard={vocab_shard}, budget={budget}): both must be >= 1")
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = budget // (vocab_shard * itemsize)
    return max(1, rows - 2 * (block_rows(vocab_shard, itemsize) + 1), rows // 3)


def chunk_rows(tokens: int, chunk_size: int | None, vocab_shard: int, dtype: torch.dtype, budget: int) -> int:
    """Rows per chunk: ``chunk_size`` as given, or (None) ``T`` split into the fewest equal
    chunks of at most :func:`chunk_for_budget` rows (at least 1)."""
    if chunk_size is not None:
        return chunk_size
    most = chunk_for_budget(vocab_shard, dtype, budget)
    return max(1, math.ceil(tokens / math.ceil(tokens / most))) if tokens else most


def chunk_bounds(tokens: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk of ``chunk`` rows; the last may be shorter."""
    return [(i, min(i + chunk, tokens)) for i in range(0, tokens, chunk)]
