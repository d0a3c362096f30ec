"""The plugin's CPU main job, short: builtin:tiny-llama -> .nemo -> Guide-GRPO through NeMo-Aligner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nemo_file(tmp_path_factory):
    from nemo_guide.backends.torch.models import builtin_path

    out = tmp_path_factory.mktemp("nemo") / "tiny_llama.nemo"
    subprocess.run([sys.executable, "-m", "nemo_guide.cli", "convert", "hf-to-nemo", str(builtin_path("builtin:tiny-llama")), str(out), "--dtype", "float32"],
                   check=True, capture_output=True, cwd=ROOT)
    return out


def test_the_cpu_main_job_runs_two_steps_through_aligner(nemo_file, tmp_path):
    log_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests_aligner" / "run_cpu.py"), "--config-path", str(ROOT / "conf" / "aligner"), "--config-name", "tiny_cpu",
           f"pretrained_checkpoint.restore_from_path={nemo_file}", f"exp_manager.explicit_log_dir={log_dir}",
           "trainer.guide.run.steps=2", "trainer.guide.run.eval_every=0", "trainer.guide.run.save_every=0", "hydra.run.dir=" + str(tmp_path / "hydra")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (log_dir / "guide" / "metrics.jsonl").read_text().splitlines()]
    before, first, last = rows[0], rows[1], rows[-1]
    # the warm start: every known-operator problem solved greedily, no novel one without its hint
    assert before["eval/pass1_known"] == 1.0 and before["eval/pass1_novel"] == 0.0
    assert first["train/guided_frac"] > 0 and first["train/reward_guided"] > 0.5  # hints make the novel operators solvable
    assert last["step"] == 2 and "eval/pass1" in last and last["optim/skipped"] == 0
    assert (log_dir / "checkpoints" / "guide_state-step=2.json").is_file()


def test_a_bad_config_stops_before_any_model_is_built(nemo_file, tmp_path):
    cmd = [sys.executable, str(ROOT / "tests_aligner" / "run_cpu.py"), "--config-path", str(ROOT / "conf" / "aligner"), "--config-name", "tiny_cpu",
           f"pretrained_checkpoint.restore_from_path={nemo_file}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
           "trainer.devices=3", "model.tensor_model_parallel_size=2", "+trainer.guide.algorithm.grup_size=4", "hydra.run.dir=" + str(tmp_path / "hydra")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 2
    assert "trainer.guide.algorithm.grup_size" in proc.stderr and "does not divide the world size 3" in proc.stderr
    assert "GPTModel" not in proc.stdout + proc.stderr  # nothing was built
