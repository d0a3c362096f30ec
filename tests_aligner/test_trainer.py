"""GuideGRPOTrainer end to end on CPU: world size 1, data parallel 2, and kill-and-resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_worker

COMPARED = ("train/reward", "train/reward_guided", "train/guided_frac", "train/rollouts", "train/trained_rollouts", "train/response_length",
            "train/entropy", "optim/grad_norm", "eval/pass1")
"""Global quantities; the ``plain/*`` and ``guided/*`` statistics are means over micro-batches,
whose partition depends on the layout."""


def _rows(result: dict) -> dict[int, dict]:
    return {r["step"]: r for r in result["rows"]}


def _same(a: dict, b: dict, keys=COMPARED, rel: float = 1e-5) -> None:
    for key in keys:
        if key in a or key in b:
            x, y = (float("nan") if v is None else v for v in (a[key], b[key]))  # metrics.jsonl writes NaN as null
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=1e-6), (key, x, y)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return run_worker("train_steps.py", str(tmp / "out"), str(tmp), "3", "1")[0]


def test_steps_guide_and_checkpoint(single):
    """Guided rollouts are sampled, trained on with their hinted-context ratios, and every step
    leaves a checkpoint with its side file."""
    rows = _rows(single)
    assert sorted(rows) == [0, 1, 2, 3]
    trained = [rows[s] for s in (1, 2, 3)]
    assert any(r["train/guided_frac"] > 0 for r in trained)
    assert all(r["train/rollouts"] == 16 + 4 * 4 * r["train/guided_frac"] for r in trained)  # B*k plain + k per guided prompt
    assert all(r["optim/updates"] == 1 and r["optim/skipped"] == 0 and r["optim/grad_norm"] > 0 for r in trained)
    assert all(r["train/entropy"] > 0 for r in trained)  # pi_old's, from the on-policy update's forward (gathered)
    for key in ("plain/clip_frac", "guided/frac_ratio_below_1e-3", "time/generation", "time/update", "perf/tokens_per_s"):
        assert key in trained[0]
    assert {f"guide_state-step={s}.json" for s in (1, 2, 3)} <= set(single["checkpoints"])
    assert "guide-step=3-last" in single["checkpoints"]


def test_data_parallel_two_equals_one_process(single, tmp_path):
    """At DP=2 every replica samples, scores and trains half of the batch; groups, advantages and
    the loss are global, so the gradient norm and the next step's samples equal the single process's."""
    results = run_worker("train_steps.py", str(tmp_path / "out"), str(tmp_path), "3", "0", nproc=2)
    one, two = _rows(single), _rows(results[0])
    for step in (1, 2, 3):
        _same(one[step], two[step])


def test_kill_after_a_checkpoint_and_resume(single, tmp_path):
    """One step, stop; then the same run to step 3 resumes from the step-1 checkpoint and its side
    file: steps 2 and 3 equal the uninterrupted run's."""
    run_worker("train_steps.py", str(tmp_path / "first"), str(tmp_path), "1", "1")
    resumed = _rows(run_worker("train_steps.py", str(tmp_path / "out"), str(tmp_path), "3", "1")[0])
    full = _rows(single)
    assert sorted(resumed) == [0, 1, 2, 3]  # rows of the first part kept, none repeated
    for step in (2, 3):
        _same(full[step], resumed[step], keys=COMPARED + ("loss/policy", "plain/ratio_mean", "guided/ratio_mean", "guided/token_frac"))


def test_time_limit_signal_checkpoints_and_the_rerun_resumes(single, tmp_path):
    """SIGUSR1 during step 2 (no checkpoint due before step 3): every rank stops after step 2 with
    its checkpoint and side file (train.main turns Preempted into exit code 75); the rerun, as a
    requeued job, resumes there and its step 3 equals the uninterrupted run's."""
    first = run_worker("train_steps.py", str(tmp_path / "first"), str(tmp_path), "3", "0", "2")[0]
    assert first["preempted"] == 2
    assert "guide_state-step=2.json" in first["checkpoints"] and "guide-step=2-last" in first["checkpoints"]
    resumed = _rows(run_worker("train_steps.py", str(tmp_path / "out"), str(tmp_path), "3", "0")[0])
    assert sorted(resumed) == [0, 1, 2, 3]
    _same(_rows(single)[3], resumed[3], keys=COMPARED + ("loss/policy", "plain/ratio_mean"))
