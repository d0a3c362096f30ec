"""The run directory across kills, Ctrl-C and a second process: nemo_guide.rundir and the loop's use of it."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

import nemo_guide.checkpoint as checkpoint_module
import nemo_guide.loop as loop_module
from nemo_guide.cli import make_backend
from nemo_guide.data.records import Record, write_records
from nemo_guide.errors import RunError
from nemo_guide.loop import train
from nemo_guide.rewards import make_reward
from nemo_guide.rundir import Interrupted, lock_holder, set_aside
from nemo_guide.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = ("algorithm.mode=grpo", "data.eval_limit=2")
"""GRPO never samples guided rollouts: one reward call for the held-out evaluation, then one per step."""


def run(cfg, backend=None, **kwargs):
    kwargs.setdefault("log", lambda s: None)
    return train(cfg, backend or make_backend(cfg), progress=False, **kwargs)


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


class InterruptingReward:
    """The exact-answer reward that raises KeyboardInterrupt (Ctrl-C) on its ``n``-th call."""

    def __init__(self, n):
        self.inner, self.n, self.calls, self.closed = make_reward("exact"), n, 0, False

    def __call__(self, prompts, completions, *, answers):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner(prompts, completions, answers=answers)

    def close(self):
        self.closed = True
        self.inner.close()


# -- item 4: one process at a time --------------------------------------------------------

HOLD = "import sys, time\nfrom nemo_guide.rundir import RunLock\nRunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n"


def test_a_second_run_of_a_directory_in_use_refuses_and_a_killed_holder_does_not_block(tiny_cfg):
    cfg = tiny_cfg("run.steps=1", *GRPO)
    run_dir = cfg.run.run_dir
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"{run_dir} is in use by another run: pid {holder.pid} on host {re.escape(socket.gethostname())}, since \d{{4}}-.*kill {holder.pid}.*another run.name"
        with pytest.raises(RunError, match=busy):
            run(cfg)
        with pytest.raises(RunError, match=busy):
            set_aside(run_dir)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: no clean-up in the holder; the kernel drops its lock
        holder.wait()
    assert lock_holder(run_dir) is None

    class Watcher:
        """A backend that checks, mid-run, that this process holds the lock."""

        def __init__(self, inner):
            self.inner, self.holders = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def train_step(self, *args, **kwargs):
            self.holders.append(lock_holder(run_dir))
            return self.inner.train_step(*args, **kwargs)

    backend = Watcher(make_backend(cfg))
    assert run(cfg, backend)["steps"] == 1
    assert backend.holders and all(h["pid"] == str(os.getpid()) and h["host"] == socket.gethostname() for h in backend.holders)
    assert lock_holder(run_dir) is None


# -- item 10: Ctrl-C ------------------------------------------------------------------------


def test_ctrl_c_closes_everything_and_says_how_to_continue(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("run.steps=3", "run.save_every=1", *GRPO)
    rewards, closed = [], []
    monkeypatch.setattr(loop_module, "make_reward", lambda name, num_workers: rewards.append(InterruptingReward(4)) or rewards[-1])
    real_close = loop_module.MetricsLogger.close
    monkeypatch.setattr(loop_module.MetricsLogger, "close", lambda self: closed.append(True) or real_close(self))
    # calls: held-out evaluation, step 1, step 2, step 3 (interrupted): checkpoints 1 and 2 are complete.
    with pytest.raises(Interrupted, match=rf"^interrupted; the last complete checkpoint is {cfg.run.run_dir}/checkpoints/step_000002: continue with the same command plus run.resume=true$") as info:
        run(cfg)
    assert isinstance(info.value, RunError) and isinstance(info.value, KeyboardInterrupt)
    assert rewards[0].closed and closed == [True] and lock_holder(cfg.run.run_dir) is None
    assert [r["step"] for r in read_metrics(cfg.run.run_dir)] == [0, 1, 2]
    monkeypatch.undo()
    assert run(tiny_cfg("run.steps=3", "run.save_every=1", *GRPO, "run.resume=true"))["steps"] == 3


# -- item 9: a run killed before its first checkpoint ---------------------------------------


@pytest.mark.parametrize("again", ["plain", "resume"])
def test_a_run_interrupted_before_its_first_checkpoint_starts_over(tiny_cfg, again):
    common = ("run.steps=2", *GRPO)
    reference = tiny_cfg(*common, "run.name=reference")
    run(reference)
    cfg = tiny_cfg(*common)
    # calls: held-out evaluation, step 1, step 2 (interrupted); the only checkpoint is the last step's.
    with pytest.raises(Interrupted, match=r"before the first checkpoint of .*: nothing to resume; run the same command again to start over"):
        run(cfg, reward_fn=InterruptingReward(3))
    run_dir = cfg.run.run_dir
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1] and not (run_dir / "checkpoints").exists()
    (run_dir / "eval").mkdir()  # a user's file next to the run's outputs is kept
    (run_dir / "eval" / "results.json").write_text("{}")
    logs = []
    run(tiny_cfg(*common, *(["run.resume=true"] if again == "resume" else [])), log=logs.append)
    assert f"{run_dir} holds a run stopped before its first checkpoint: starting it over (cleared metrics.jsonl, tensorboard, config.json)" in logs
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(reference.run.run_dir))
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # the killed run's events are gone
    assert (run_dir / "eval" / "results.json").is_file()


def test_resume_of_a_run_that_never_started_is_refused(tiny_cfg):
    cfg = tiny_cfg("run.steps=1", "run.name=typo", "run.resume=true")
    with pytest.raises(RunError, match=r"run.resume=true but .*typo holds no run \(no checkpoint, no metrics\); start without run.resume"):
        run(cfg)
    assert not cfg.run.run_dir.exists()


# -- item 19: refusals write nothing --------------------------------------------------------


def test_refused_data_or_config_writes_nothing(tiny_cfg, tmp_path):
    data = tmp_path / "nohint.jsonl"
    write_records(data, [Record("a", "Q:12+34=", "46", hint="+=1a+1b"), Record("b", "Q:13+34=", "47")])
    cfg = tiny_cfg("run.steps=1", f"data.train={data}", "data.reward=exact")
    with pytest.raises(RunError, match="'b' has no hint"):
        run(cfg)
    assert not cfg.run.run_dir.exists()
    # A finished run, resumed with another config: refused before its outputs are touched.
    done = tiny_cfg("run.steps=1", *GRPO, "run.name=done")
    run(done)
    before = {p: p.stat().st_mtime_ns for p in done.run.run_dir.rglob("*")}
    with pytest.raises(RunError, match="another config"):
        run(tiny_cfg("run.steps=2", *GRPO, "run.name=done", "run.resume=true", "algorithm.group_size=2"))
    assert {p: p.stat().st_mtime_ns for p in done.run.run_dir.rglob("*")} == before


# -- item 8: kills during checkpoint writes and pruning ---------------------------------------


def test_a_kill_while_pruning_leaves_a_resumable_run_and_its_leftovers_are_removed(tiny_cfg, monkeypatch):
    common = ("run.steps=3", "run.save_every=1", "run.keep_checkpoints=1", *GRPO)
    cfg = tiny_cfg(*common)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if ".deleting-" in str(path):  # the first pruning (of step_000001): delete one file, then die
            next(p for p in sorted(path.iterdir())).unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(Interrupted, match="last complete checkpoint is .*step_000002"):
        run(cfg)
    monkeypatch.undo()
    ckpts = cfg.run.run_dir / "checkpoints"
    # Also what a kill mid-write leaves: a temporary checkpoint, a config.json being replaced.
    (ckpts / "step_000003.tmp-99999").mkdir()
    (ckpts / "step_000003.tmp-99999" / "model.safetensors").write_bytes(b"half")
    (cfg.run.run_dir / "config.json.tmp-99999").write_text("{")
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_000001.deleting-{os.getpid()}", "step_000002", "step_000003.tmp-99999"]
    logs = []
    assert run(tiny_cfg(*common, "run.resume=true"), log=logs.append)["steps"] == 3
    removed = [line for line in logs if line.startswith("removed")]
    assert removed == [f"removed 3 leftover(s) of an interrupted run: config.json.tmp-99999, checkpoints/step_000001.deleting-{os.getpid()}, checkpoints/step_000003.tmp-99999"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003"]
    assert not [p for p in cfg.run.run_dir.iterdir() if ".tmp-" in p.name]


# -- item 20: make train -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_moves_the_previous_run_aside(tmp_path):
    venv, runs = tmp_path / "venv", tmp_path / "runs"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    calls = tmp_path / "calls.txt"
    fake = venv / "bin" / "nemo-guide"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nmkdir -p {runs}/tiny_cpu/checkpoints\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than setup.cfg: no install

    def make_train():
        return subprocess.run(["make", "-s", "-C", REPO, "train", f"VENV={venv}", f"RUNS={runs}"], capture_output=True, text=True)

    out = make_train()
    assert out.returncode == 0, out.stderr
    assert calls.read_text() == f"train conf/tiny_cpu.yaml run.output_dir={runs}\n"
    results = runs / "tiny_cpu" / "checkpoints" / "step_000120" / "eval" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text('{"pass1": 0.99}')
    out = make_train()
    assert out.returncode == 0, out.stderr
    (previous,) = [p for p in runs.iterdir() if p.name.startswith("tiny_cpu.prev-")]
    assert f"the previous run {runs}/tiny_cpu was moved to {previous}" in out.stdout
    assert json.loads((previous / "checkpoints" / "step_000120" / "eval" / "results.json").read_text()) == {"pass1": 0.99}
    assert calls.read_text().count("\n") == 2 and (runs / "tiny_cpu").is_dir()
