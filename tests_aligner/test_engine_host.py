"""The plugin's TensorRT-LLM path on CPU with a stand-in engine (Megatron's generation behind the
engine wrapper's interface, refusing any batch but its own): engine calls always carry the
engine's batch, padded rows never reach the rollouts, the probe runs at start-up and every
``probe_every`` steps and passes, the sampler log-probs feed the rollout correction, and each
step logs throughput, padding and refit time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_worker


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine_host")
    return run_worker("engine_host.py", str(tmp / "out"), str(tmp), nproc=1)[0]


def test_engine_calls_carry_the_engine_batch_and_padding_never_reaches_the_rollouts(result):
    assert result["calls"] and set(result["calls"]) == {3}
    rows = {r["step"]: r for r in result["rows"]}
    for step in (1, 2, 3):
        r = rows[step]
        assert r["train/rollouts"] == 16 + 4 * 4 * r["train/guided_frac"]  # B*k plain + k per guided prompt, no padding row
        assert 0 < r["perf/padded_row_frac"] < 0.5 and r["perf/gen_tokens_per_s_per_gpu"] > 0
        assert (step == 1) != ("time/refit" in r)  # step 1 samples from the weights the start-up probe refitted
        # the stand-in reports the actor's own log-probs: the correction sees no mismatch
        assert r["rollout/logprob_diff_mean"] < 1e-5 and r["rollout/tis_clip_frac"] == 0.0
    assert any(rows[s]["train/guided_frac"] > 0 for s in (1, 2, 3))
    assert rows[0]["time/engine_build"] > 0  # built by the start-up probe


def test_the_probe_runs_at_start_up_and_every_probe_every_steps(result):
    probes = result["history"]["probes"]
    assert [p["step"] for p in probes] == [0, 2]
    assert all(p["probe/logprob_diff_mean"] < 1e-5 and p["probe/greedy_diff_frac"] == 0.0 for p in probes)
    rows = {r["step"]: r for r in result["rows"]}
    assert "probe/logprob_diff_mean" in rows[0] and "probe/logprob_diff_mean" in rows[2] and "probe/logprob_diff_mean" not in rows[1]
    reports = [m for m in result["logged"] if m.startswith("TensorRT-LLM probe at step")]
    assert len(reports) == 2 and reports[0].endswith("result: pass")
