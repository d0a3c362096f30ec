"""`nemo-guide doctor` in the pinned CPU tier: NeMo, Aligner and megatron-core found at their pins,
the GPU-only pieces reported missing with their reasons."""

from __future__ import annotations

import json
import subprocess
import sys


def test_doctor_reports_the_stack_and_why_each_gpu_feature_is_unusable():
    out = subprocess.run([sys.executable, "-m", "nemo_guide.cli", "doctor", "--json"], capture_output=True, text=True, timeout=600, check=True)
    rep = json.loads(out.stdout[out.stdout.index("{"):])
    assert rep["versions"]["NeMo"] == "2.1.0" and rep["versions"]["NeMo-Aligner"] == "0.7.0" and rep["versions"]["megatron-core"] == "0.10.0"
    assert rep["pin_problems"] == ["TensorRT-LLM is not installed (pinned 0.13.0)"]
    features = {f["name"]: f for f in rep["features"]}
    trainer = features["NeMo-Aligner trainer"]
    assert not trainer["usable"] and trainer["reason"].startswith("import nemo_guide.aligner.build failed")  # unpatched NeMo on CPU
    assert "not installed" in features["TensorRT-LLM rollouts"]["reason"]
    assert features["bf16 training"]["reason"] == "no CUDA device visible"
