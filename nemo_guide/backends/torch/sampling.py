"""Batched autoregressive sampling with a KV cache (temperature, top-p, EOS, length limit).

The model is reached through one callable, ``step(input_ids, attention_mask, cache, capacity)
-> (last_logits, cache)``, so the built-in decoder and any Hugging Face causal LM share this
loop. Prompts are left-padded; ``attention_mask`` marks real tokens, and the model derives
positions from it. Randomness comes only from the ``generator`` argument, so a fixed seed
reproduces the same rollouts.

Nothing grows per token: the attention mask of the whole call is built once (prompt columns,
then all-True columns for the generated tokens; finished rows keep decoding pads) and each
call sees a view of its first ``S`` columns, and ``capacity`` (the longest sequence of the
call) lets the step allocate its KV cache once on the prefill call (``cache`` None). A view
holds the same values in the same shape as the tensor ``torch.cat`` would have grown, so the
sampled tokens are the same bit for bit (``preallocate=False`` keeps the growing path).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor, Any, "int | None"], tuple[torch.Tensor, Any]]
"""``step(ids [B, T], mask [B, S], cache, capacity) -> (last_logits [B, V], cache)``: ``capacity``
is the most positions ``S`` the call will reach (None: the step grows its cache)."""


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], mask [B, P])``: sequences right-aligned, ``mask`` True on real tokens."""
    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq):] = True
    return ids.to(device), mask.to(device)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, width: int | None = None, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])``: sequences left-aligned, padded to ``width`` (default: longest)."""
    width = max((len(s) for s in sequences), default=0) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if len(seq) > width:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than the width {width}")
        if len(seq):
            ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, : len(seq)] = True
    return ids.to(device), mask.to(device)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the nucleus of mass ``top_p`` set to -inf. Shape: ``[B, V]``.

    The most likely token always stays, so no row becomes empty.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None, with_logprobs: bool = False):
    """Greedy (``temperature == 0``) or sampled next tokens from ``logits [B, V]``.

    Returns ``(tokens [B], logprobs [B] | None)``: the tokens and, when asked, their log-prob
    under the distribution they were drawn from (after temperature and top-p; greedy: temperature 1).
    """
    if temperature == 0:
        tok = logits.argmax(dim=-1)
        return tok, (logits.float().log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1) if with_logprobs else None)
    logits = filter_top_p(logits.float() / temperature, top_p)
    probs = logits.softmax(dim=-1)
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, (logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1) if with_logprobs else None)


@torch.no_grad()
def generate(
    step: StepFn,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    return_logprobs: bool = False,
    preallocate: bool = True,
):
    """Sample one response per prompt.

    ``preallocate=False`` grows the mask and the KV cache by ``torch.cat`` at every token (the
    reference of the preallocated path: the same tokens and log-probs).

    Returns:
        ``(responses, finished)``: response token ids (ending with the EOS token when the
        model stopped) and whether each response ended with EOS before ``max_new_tokens``;
        with ``return_logprobs`` also each response's per-token sampling log-probs (see
        :func:`next_tokens`). The same seed samples the same tokens either way.
    """
    if not eos_ids:
        raise ValueError("generation needs at least one EOS token id")
    ids, mask = left_pad(prompts, pad_id, device)
    batch, width = ids.shape
    fed = max(0, max_new_tokens - 1)  # generated tokens fed back (the last sampled one never is)
    capacity = width + fed
    if preallocate:
        # [B, P + max_new_tokens - 1]: generated columns are real for every row (finished rows decode pads)
        full_mask = torch.cat([mask, torch.ones((batch, fed), dtype=torch.bool, device=device)], dim=1)
        logits, cache = step(ids, full_mask[:, :width], None, capacity)  # [B, V]
    else:
        logits, cache = step(ids, mask, None, None)
    eos = torch.as_tensor(list(eos_ids), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    length = torch.zeros(batch, dtype=torch.long, device=device)
    lps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    for t in range(max_new_tokens):
        tok, lp = next_tokens(logits, temperature, top_p, generator, return_logprobs)  # [B]
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out[:, t] = tok
        if lp is not None:
            lps[:, t] = lp
        length += (~done).long()
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        # Finished rows keep decoding pad tokens (ignored) so the batch stays rectangular.
        if preallocate:
            mask = full_mask[:, : width + t + 1]  # [B, S + 1], a view
        else:
            mask = torch.cat([mask, torch.ones_like(done)[:, None]], dim=1)  # [B, S + 1]
        logits, cache = step(tok[:, None], mask, cache, capacity if preallocate else None)
    out, length, done = out.cpu(), length.cpu(), done.cpu()
    responses = [out[i, : int(length[i])].tolist() for i in range(batch)]
    if return_logprobs:
        return responses, done.tolist(), [lps[i, : int(length[i])].tolist() for i in range(batch)]
    return responses, done.tolist()
