"""Prompts in fixed-size engine batches: padding with inert prompts, and dropping them again.

NeMo-Aligner's TensorRT-LLM wrapper is set up for one batch size (``rollout_micro_batch_size``:
the engine's ``max_batch_size`` and the rows of its stop-word list), but the number of prompts a
data-parallel replica generates varies from step to step: guided re-rolls exist only for the
prompts whose plain rollouts all failed. :func:`engine_chunks` cuts a replica's prompts into
chunks of exactly the engine's batch, the last one filled up with an *inert* prompt (one token,
the pad/EOS id: cheap, and its output is never looked at); :func:`real_outputs` keeps the real
rows' outputs, in order, and drops the padding rows', so that a padded row can never reach a
rollout batch, a reward or the loss.

Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EngineChunk:
    """One engine call: ``rows`` prompts, the first ``real`` of them real, the rest inert."""

    prompts: list[list[int]]
    real: int

    @property
    def padded(self) -> int:
        return len(self.prompts) - self.real


def engine_chunks(prompts: Sequence[Sequence[int]], batch: int, inert: Sequence[int]) -> list[EngineChunk]:
    """``prompts`` in order, in chunks of exactly ``batch`` rows (none for no prompt).

    Args:
        prompts: this replica's prompts (token ids).
        batch: the engine's batch size (>= 1).
        inert: the prompt padding rows get (e.g. ``[eos_id]``).
    """
    if batch < 1:
        raise ValueError(f"the engine batch must be >= 1, got {batch}")
    if not inert:
        raise ValueError("the inert prompt needs at least one token")
    out = []
    for start in range(0, len(prompts), batch):
        part = [list(p) for p in prompts[start : start + batch]]
        out.append(EngineChunk(part + [list(inert)] * (batch - len(part)), len(part)))
    return out


def real_outputs(chunks: Sequence[EngineChunk], outputs: Sequence[Sequence[T]]) -> list[T]:
    """The real rows' outputs of every chunk, in prompt order (``outputs[c]`` holds one item
    per row of ``chunks[c]``, padding rows included)."""
    if len(outputs) != len(chunks):
        raise ValueError(f"{len(outputs)} engine outputs for {len(chunks)} chunks")
    kept: list[T] = []
    for chunk, out in zip(chunks, outputs, strict=True):
        if len(out) != len(chunk.prompts):
            raise ValueError(f"an engine output has {len(out)} rows for a chunk of {len(chunk.prompts)}")
        kept.extend(out[: chunk.real])
    return kept


def padded_fraction(chunks: Sequence[EngineChunk]) -> float:
    """Padding rows over all rows sent to the engine (0 for no chunk)."""
    rows = sum(len(c.prompts) for c in chunks)
    return sum(c.padded for c in chunks) / rows if rows else 0.0
