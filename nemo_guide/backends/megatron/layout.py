"""Where each response token sits when rollouts are laid out as token rows (pure torch).

Megatron-core, and NeMo-Aligner on top of it, score a rollout as one row
``[prompt | response | pad]``: right-padded, positions from 0, so causal attention alone
keeps padding out of every real token's context. Per-token values then live in one of
three layouts:

- **token rows** ``[b, s]``: the ids themselves (Aligner's ``response_tokens`` key);
- **prediction columns** ``[b, s-1]``: column ``j`` holds a value about token ``j+1``
  predicted from tokens ``<= j``. This is the layout of Aligner's log-probs
  (``from_parallel_logits_to_logprobs``, ``get_inference_log_probs``) and of its ``mask``
  key; response token ``t`` of row ``i`` sits at column ``prompt_lengths[i] - 1 + t``,
  which is also the sequence position whose final hidden state predicts it;
- **response-aligned** ``[N, L]``: response token ``t`` at column ``t`` whatever the
  prompt, the layout of the core loss (DESIGN section 3).

The same response sits in different prediction columns behind the plain and the hinted
prompt: :func:`realign` moves per-token values between any two of these layouts.

``response_lengths`` here always counts generated tokens only (``len(response_ids)``).
Aligner's ``response_lengths`` key is the end of the sequence, prompt included: pass
``response_lengths - prompt_lengths`` of an Aligner batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenRows:
    """Rollouts laid out as ``[prompt | response | pad]`` rows."""

    tokens: torch.Tensor
    """Shape: ``[b, s]``, long (rows past the rollouts, if any, are all padding)."""
    prompt_lengths: torch.Tensor
    """Shape: ``[b]``, long (0 for padding rows)."""
    response_lengths: torch.Tensor
    """Shape: ``[b]``, long: generated tokens per row (0 for padding rows)."""


def lay_out(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    *,
    rows: int | None = None,
    seq_len: int | None = None,
) -> TokenRows:
    """Lay out rollout ``i`` as row ``i``: its prompt, its response, then ``pad_id``.

    Args:
        prompts: the prompt of each rollout in the context being scored (plain or the one
            it was sampled with).
        responses: the response of each rollout (may be empty).
        rows: rows of the block, ``>= len(prompts)``; the extra rows are all padding (so a
            host can keep every micro-batch the same shape). Default: one per rollout.
        seq_len: columns of the block; default the longest ``prompt + response``.

    Returns:
        ``tokens`` of Shape ``[rows, seq_len]`` with the prompt and response lengths.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; lay out one prompt per response")
    rows = len(prompts) if rows is None else rows
    if rows < len(prompts):
        raise ValueError(f"rows = {rows} cannot hold {len(prompts)} rollouts; pass rows >= {len(prompts)}")
    lengths = [len(p) + len(o) for p, o in zip(prompts, responses, strict=True)]
    longest = max(lengths, default=0)
    seq_len = longest if seq_len is None else seq_len
    if seq_len < longest:
        i = lengths.index(longest)
        raise ValueError(f"seq_len = {seq_len} is shorter than rollout {i} (prompt {len(prompts[i])} + response {len(responses[i])} tokens); pass seq_len >= {longest}")
    tokens = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    prompt_lengths = torch.zeros(rows, dtype=torch.long)
    response_lengths = torch.zeros(rows, dtype=torch.long)
    for i, (p, o) in enumerate(zip(prompts, responses, strict=True)):
        if not p:
            raise ValueError(f"rollout {i} has an empty prompt; every response token needs a context token before it (add BOS or the chat template)")
        row = list(p) + list(o)
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        prompt_lengths[i], response_lengths[i] = len(p), len(o)
    return TokenRows(tokens, prompt_lengths, response_lengths)


def response_positions(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The place of every response token, row by row.

    Response token ``steps[j]`` of row ``rows[j]`` is ``tokens[rows[j], cols[j] + 1]``; it is
    predicted by the final hidden state at sequence position ``cols[j]`` and sits at column
    ``cols[j]`` of the prediction layout, ``cols[j] = prompt_lengths[rows[j]] - 1 + steps[j]``.

    Args:
        prompt_lengths: Shape: ``[b]``, long.
        response_lengths: generated tokens per row. Shape: ``[b]``, long.
        width: columns of the prediction layout (``s - 1`` for ``[b, s]`` token rows).

    Returns:
        ``(rows, cols, steps)``, each Shape ``[T]``, long, ``T = response_lengths.sum()``,
        on the device of ``response_lengths``.
    """
    if prompt_lengths.shape != response_lengths.shape or prompt_lengths.dim() != 1:
        raise ValueError(f"prompt_lengths and response_lengths must both be [b]; got {tuple(prompt_lengths.shape)} and {tuple(response_lengths.shape)}")
    response_lengths = response_lengths.long()
    prompt_lengths = prompt_lengths.long().to(response_lengths.device)
    if response_lengths.numel() and int(response_lengths.min()) < 0:
        raise ValueError(f"response_lengths must be >= 0, got {response_lengths.tolist()}")
    has_response = response_lengths > 0
    if bool((prompt_lengths[has_response] < 1).any()):
        raise ValueError(f"a row with response tokens needs a prompt of >= 1 token; prompt_lengths = {prompt_lengths.tolist()}")
    ends = torch.where(has_response, prompt_lengths - 1 + response_lengths, 0)  # [b]: one past the last column
    if ends.numel() and int(ends.max()) > width:
        i = int(ends.argmax())
        raise ValueError(
            f"row {i}: prompt {int(prompt_lengths[i])} + response {int(response_lengths[i])} tokens need {int(ends[i])} prediction "
            f"columns, the layout has {width}. response_lengths counts generated tokens only (Aligner's response_lengths key is "
            "the sequence end: pass response_lengths - prompt_lengths)"
        )
    device = response_lengths.device
    rows = torch.repeat_interleave(torch.arange(len(response_lengths), device=device), response_lengths)  # [T]
    starts = torch.cumsum(response_lengths, 0) - response_lengths  # [b]: first token of each row in [T]
    steps = torch.arange(len(rows), device=device) - starts[rows]  # [T]
    cols = prompt_lengths[rows] - 1 + steps  # [T]
    return rows, cols, steps


def realign(
    values: torch.Tensor,
    response_lengths: torch.Tensor,
    *,
    src_prompt_lengths: torch.Tensor | None,
    dst_prompt_lengths: torch.Tensor | None,
    width: int,
) -> torch.Tensor:
    """Move per-response-token values from one layout to another; zero (False) elsewhere.

    A layout is the prediction columns behind prompts of the given lengths (Shape
    ``[b, s-1]``, Aligner's log-prob layout) or, for ``None``, the response-aligned
    ``[N, L]`` layout of the core loss. Examples:

    - old log-probs from Aligner's ``get_inference_log_probs`` on hinted prompt + response
      to the core loss: ``src_prompt_lengths=sample_lengths, dst_prompt_lengths=None,
      width=L``;
    - the same values moved behind the plain prompt in Aligner's layout:
      ``src_prompt_lengths=sample_lengths, dst_prompt_lengths=plain_lengths, width=s-1``;
    - a ``[N, L]`` ``loss_mask`` to Aligner's ``mask`` key: ``src_prompt_lengths=None,
      dst_prompt_lengths=plain_lengths, width=s-1``.

    Args:
        values: Shape: ``[b, W]`` in the source layout (any dtype).
        response_lengths: generated tokens per row. Shape: ``[b]``, long.
        src_prompt_lengths, dst_prompt_lengths: Shape: ``[b]``, long, or None.
        width: columns of the result.

    Returns:
        Shape: ``[b, width]``, the dtype and device of ``values``.
    """
    if values.dim() != 2 or values.shape[0] != response_lengths.shape[0]:
        raise ValueError(f"values must be [b, W] with b = {response_lengths.shape[0]} rows, got {tuple(values.shape)}")
    ones = torch.ones_like(response_lengths)  # a response-aligned row behaves like a 1-token prompt
    src = ones if src_prompt_lengths is None else src_prompt_lengths
    dst = ones if dst_prompt_lengths is None else dst_prompt_lengths
    rows, src_cols, _ = response_positions(src, response_lengths, values.shape[1])
    _, dst_cols, _ = response_positions(dst, response_lengths, width)
    out = torch.zeros(values.shape[0], width, dtype=values.dtype, device=values.device)
    index = rows.to(values.device)
    out[index, dst_cols.to(values.device)] = values[index, src_cols.to(values.device)]
    return out
