"""The TensorRT-LLM export from a real NeMo actor (CPU): the engine weights each TP rank builds
from its own state dict compute the actor's function in TensorRT-LLM's Llama graph, and lose it
without the attention bias (what the stock NeMo 2.1 export does to Qwen2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_worker


@pytest.mark.parametrize("tp", [1, 2])
def test_actor_engine_weights_reproduce_the_actor_only_with_the_qkv_bias(tmp_path, tp):
    results = run_worker("trt_weights.py", str(tmp_path / "out"), str(tmp_path), nproc=tp)
    assert all(r["shapes_match"] and r["attn_bias"] and r["qkv_bias_abs"] > 1.0 for r in results)
    first = results[0]
    assert first["logit_max_abs_diff"] < 1e-4 * max(1.0, first["logit_max_abs"]), first
    assert first["unfixed_logprob_gap_mean"] > 0.05, first
