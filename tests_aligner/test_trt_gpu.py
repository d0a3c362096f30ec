"""TensorRT-LLM engines for tiny random Qwen2 and Llama actors, on a GPU (NeMo-Aligner's image).

Not run on the development machines (no GPU, no TensorRT-LLM): the ``gpu`` marker, and a skip
without CUDA or TensorRT-LLM. What it checks: the Guide export's engine passes the probe (greedy
decisions and sampled-token log-probs against the Megatron actor) at build and after a refit of
changed weights, for Qwen2 and Llama; the same engine without the attention bias (the stock
export's config) fails it for Qwen2; and NeMo 2.1's own export builds a Qwen2 engine that holds
no QKV bias and decodes differently from Megatron.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (gpu marker)"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None, reason="needs TensorRT-LLM (NeMo-Aligner's image)"),
]


def _engine(tmp_path, family, mode):
    return run_worker("trt_engine_gpu.py", str(tmp_path / "out"), str(tmp_path), family, mode, nproc=1, timeout=1800)[0]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_the_guide_export_passes_the_probe_at_build_and_after_refit(tmp_path, family):
    result = _engine(tmp_path, family, "guide")
    for phase in ("build", "refit"):
        probe = result[phase]
        assert probe["failures"] == [], probe["report"]
        assert probe["tokens"] > 20
    assert result["timings"]["engine_build"] > 0 and result["timings"]["refit"] > 0


def test_qwen2_without_the_attention_bias_fails_the_probe(tmp_path):
    result = _engine(tmp_path, "qwen2", "nobias")
    assert result["build"]["failures"], result["build"]["report"]
    assert result["build"]["probe/logprob_diff_mean"] > 0.05


def test_the_stock_export_drops_qwen2s_qkv_bias(tmp_path):
    result = _engine(tmp_path, "qwen2", "stock")
    assert result["engine_qkv_bias_weights"] == 0
    assert result["greedy_disagreements"] > 0
