"""Guided re-rolls on a fixed-batch engine: padding to the engine's batch with inert prompts and
dropping them again. Property: whatever the number of prompts per replica, every real row
survives in order and no padded row reaches the rollout batch or the loss."""

from __future__ import annotations

import random

import pytest
import torch

from nemo_guide.aligner.engine_batch import EngineChunk, engine_chunks, padded_fraction, real_outputs
from nemo_guide.core.loss import guide_policy_loss
from nemo_guide.steps import build_batch

INERT = [0]
SENTINEL = 999  # the fake engine answers an inert prompt with it


def fake_engine(chunk: EngineChunk, batch: int) -> list[tuple[list[int], bool]]:
    """One response per row of a full engine batch: a real prompt's response repeats its last
    token (1 + its length times), an inert prompt's is the sentinel."""
    assert len(chunk.prompts) == batch
    return [([SENTINEL] * 3 if p == INERT else [p[-1]] * (1 + len(p)), True) for p in chunk.prompts]


@pytest.mark.parametrize("batch", range(1, 9))
def test_real_rows_survive_in_order_and_padded_rows_never_reach_the_loss(batch):
    """Every number of prompts from 0 to 23 (random lengths and tokens) for each engine batch 1-8."""
    rng = random.Random(batch)
    for count in range(24):
        prompts = [[rng.randint(1, 50) for _ in range(rng.randint(1, 5))] for _ in range(count)]
        _check(prompts, batch)


def _check(prompts: list[list[int]], batch: int) -> None:
    chunks = engine_chunks(prompts, batch, INERT)
    assert all(len(c.prompts) == batch for c in chunks)  # the engine always gets its fixed batch
    assert sum(c.real for c in chunks) == len(prompts) and all(c.padded == 0 for c in chunks[:-1])
    rows = real_outputs(chunks, [fake_engine(c, batch) for c in chunks])
    responses = [r for r, _ in rows]
    assert responses == [[p[-1]] * (1 + len(p)) for p in prompts]  # every real row, in order
    if not prompts:
        return
    # the rollout batch and the loss see exactly the real rows' tokens
    n = len(prompts)
    rollout = build_batch(prompts, prompts, responses, torch.zeros(n), torch.arange(n), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))
    assert all(SENTINEL not in r for r in rollout.response_ids)
    assert int(rollout.loss_mask.sum()) == sum(1 + len(p) for p in prompts)
    logprobs = torch.zeros(rollout.loss_mask.shape, requires_grad=True)
    loss, _ = guide_policy_loss(logprobs, torch.zeros_like(logprobs), torch.ones(n), rollout.loss_mask, rollout.guided)
    loss.backward()
    assert torch.equal(logprobs.grad != 0, rollout.loss_mask)


def test_chunks_by_hand():
    chunks = engine_chunks([[1], [2, 3], [4]], 2, [0])
    assert chunks == [EngineChunk([[1], [2, 3]], 2), EngineChunk([[4], [0]], 1)]
    assert padded_fraction(chunks) == 0.25 and padded_fraction([]) == 0.0
    assert real_outputs(chunks, [["a", "b"], ["c", "pad"]]) == ["a", "b", "c"]
    assert engine_chunks([], 3, [0]) == []


def test_mismatched_outputs_and_bad_arguments_raise():
    chunks = engine_chunks([[1], [2]], 2, [0])
    with pytest.raises(ValueError, match="an engine output has 1 rows for a chunk of 2"):
        real_outputs(chunks, [["a"]])
    with pytest.raises(ValueError, match="2 engine outputs for 1 chunks"):
        real_outputs(chunks, [["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match="engine batch must be >= 1"):
        engine_chunks([[1]], 0, [0])
    with pytest.raises(ValueError, match="inert prompt"):
        engine_chunks([[1]], 2, [])
