"""``nemo-guide experiment``: grid checks, the smoke grid end to end, kill and --resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_guide.experiment.grid import GridError, load_grid
from nemo_guide.experiment.job import eval_metrics
from nemo_guide.experiment.report import mean_std, metric_value

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "conf" / "experiments" / "smoke.yaml"
PAPER = ROOT / "conf" / "experiments" / "paper.yaml"


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(f"base: {ROOT / 'conf' / 'tiny_cpu.yaml'}\noutput_dir: {tmp_path / 'out'}\n" + text)
    return path


GOOD = """seeds: [0, 1]
tables:
  t:
    rows:
      a: {}
      b: {algorithm.mode: grpo}
    columns: {p: eval.pass1.all}
"""


def test_shipped_grids_load_and_dedupe_rows():
    grid = load_grid(PAPER)
    assert len(grid.seeds) >= 3
    # Guide-GRPO appears in every table but is one run per seed; a row equal to the base
    # config (threshold all_incorrect, shaping percentile per rollout) is the same run too.
    names = [r.name for r in grid.runs]
    assert len(names) == len(set(names))
    assert sum(r.name.startswith("base-") for r in grid.runs) == len(grid.seeds)
    rows = {(t.name, r.label): r.slug for t in grid.tables for r in t.rows}
    assert rows[("table3", "guidance_threshold=all_incorrect")] == "base"
    assert rows[("table1", "Guide-GRPO")] == "base"
    assert len(load_grid(SMOKE).runs) == 4


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("seeds: [0, 1]", "seeds: []"), "seeds = []"),
        (GOOD.replace("seeds: [0, 1]", "seeds: [0, 1]\nsteps: 3"), "unknown key 'steps'"),
        (GOOD.replace("rows:\n      a: {}\n      b: {algorithm.mode: grpo}", "axes: {algorithm.shaping: []}"), "tables.t.axes.algorithm.shaping = []"),
        (GOOD.replace("algorithm.mode: grpo", "algorithm.moed: grpo"), "unknown key 'algorithm.moed'"),
        (GOOD.replace("algorithm.mode: grpo", "algorithm.mode: ppo"), "algorithm.mode"),
        (GOOD.replace("eval.pass1.all", "eval.pass8.all"), "pass@K needs K in eval.k"),
        (GOOD + "progress: {rows: [t/c]}\n", "'t/c' is not a row"),
        (GOOD + "set: {run.seed: 3}\n", "the grid sets run.seed itself"),
    ],
)
def test_bad_grid_is_refused_before_anything_runs(tmp_path, text, expected):
    path = _grid(tmp_path, text)
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert expected in message, message
    assert f"{path}:" in message  # names the file (and the line where the key is found)
    assert not (tmp_path / "out").exists()


def test_bad_grid_line_numbers(tmp_path):
    path = _grid(tmp_path, GOOD.replace("seeds: [0, 1]", "seeds: []"))
    with pytest.raises(GridError, match=rf"{path}:3: seeds = \[\]"):
        load_grid(path)


def test_cli_refuses_bad_grid_with_exit_2(tmp_path):
    path = _grid(tmp_path, GOOD.replace("seeds: [0, 1]", "seeds: []"))
    proc = subprocess.run([sys.executable, "-m", "nemo_guide.cli", "experiment", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "seeds = []" in proc.stderr and "nothing was run" in proc.stderr


def test_eval_metrics_by_kind(tmp_path):
    rows = []
    # problem a (known): greedy right, samples 1/2; problem b (novel): greedy wrong, samples 0/2.
    for pid, greedy, samples in (("a", True, (True, False)), ("b", False, (False, False))):
        rows.append({"benchmark": "x", "id": pid, "sample": -1, "guided": False, "correct": greedy})
        rows += [{"benchmark": "x", "id": pid, "sample": i, "guided": False, "correct": c} for i, c in enumerate(samples)]
        rows.append({"benchmark": "x", "id": pid, "sample": 0, "guided": True, "correct": True})  # ignored
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = eval_metrics(path, {"a": ("known", "op:+"), "b": ("novel",)}, (1, 2))
    assert m["all"]["pass1"] == 0.5 and m["all"]["pass1_mean"] == 0.25
    assert m["all"]["pass2"] == 0.5  # a: 1 - C(1,2)/C(2,2) = 1; b: 0
    assert m["known"]["pass1"] == 1.0 and m["known"]["pass2"] == 1.0 and m["novel"]["pass2"] == 0.0
    assert m["op:+"] == m["known"]


def test_metric_values_and_mean_std(tmp_path):
    run = tmp_path / "r"
    (run / "experiment").mkdir(parents=True)
    (run / "experiment" / "done.json").write_text(json.dumps({"eval": {"novel": {"pass1": 0.25}}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/reward": r}) + "\n" for s, r in ((1, 0.5), (2, 0.1), (3, 0.3))))
    (run / "summary.json").write_text(json.dumps({"wall_seconds": 12.5, "eval_after": {"novel": 0.75}}))
    cache: dict = {}
    assert metric_value(run, "eval.pass1.novel", cache) == 0.25
    assert metric_value(run, "eval.pass1.known", cache) is None
    assert metric_value(run, "train.first.train/reward", cache) == 0.5
    assert metric_value(run, "train.last.train/reward", cache) == 0.3
    assert math.isclose(metric_value(run, "train.mean.train/reward", cache), 0.3)
    assert metric_value(run, "train.max.train/reward", cache) == 0.5
    assert metric_value(run, "summary.wall_seconds", cache) == 12.5
    assert metric_value(run, "summary.eval_after.novel", cache) == 0.75
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)


def _experiment(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nemo_guide.cli", "experiment", str(SMOKE), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True,
    )


def test_smoke_grid_killed_then_resumed_produces_a_full_report(tmp_path):
    """The CI smoke: kill the grid once a run has finished, --resume skips it, every cell is a number."""
    out = tmp_path / "grid"
    proc = _experiment("--out", str(out), "--jobs", "1")
    runs = out / "runs"
    deadline = time.time() + 240
    first: Path | None = None
    while time.time() < deadline and proc.poll() is None:
        done = sorted(runs.glob("*/experiment/done.json")) if runs.exists() else []
        if done:
            first = done[0]
            break
        time.sleep(0.2)
    assert first is not None, proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)  # the grid process only: its jobs die with it (PR_SET_PDEATHSIG)
    proc.wait()
    stamp = first.stat().st_mtime_ns
    time.sleep(1.0)
    assert len(list(runs.glob("*/experiment/done.json"))) < 4

    again = subprocess.run([sys.executable, "-m", "nemo_guide.cli", "experiment", str(SMOKE), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing grid directory needs --resume

    resumed = _experiment("--out", str(out), "--jobs", "2", "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "1 finished, 3 to run" in log
    assert first.stat().st_mtime_ns == stamp  # not redone

    report = json.loads((out / "report.json").read_text())
    cells = [c for table in report["tables"].values() for row in table for c in row["cells"].values()]
    assert cells and all(isinstance(v, float) and math.isfinite(v) for c in cells for v in c["values"])
    assert all(math.isfinite(c["mean"]) and math.isfinite(c["std"]) for c in cells)
    text = (out / "report.md").read_text()
    assert "| warm_start |" in text and "±" in text and " - " not in text.split("### Methods")[1]
    assert (out / "progress.png").stat().st_size > 0 and (out / "pass_at_k.png").stat().st_size > 0
    steps = report["progress"]["methods/guide_grpo"]["0"]
    assert [s["step"] for s in steps] == [2, 4]
    # each run directory is an ordinary one
    assert (runs / "base-s0" / "summary.json").exists() and (runs / "base-s0" / "checkpoints").exists()
