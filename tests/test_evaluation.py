"""nemo-guide eval: hand-computed summaries, and the command end to end on the tiny policy."""

import json
import math

import pytest

from conftest import BENCHMARKS, SMALL, TINY_CONF
from nemo_guide.cli import main
from nemo_guide.eval_report import markdown_table, mean_ci, problem_stats, summarize
from nemo_guide.samples import read_samples


def _rows(bench, pid, greedy, samples, guided=False):
    rows = [{"benchmark": bench, "id": pid, "sample": -1, "guided": guided, "text": "", "correct": greedy}]
    rows += [{"benchmark": bench, "id": pid, "sample": i, "guided": guided, "text": "", "correct": c} for i, c in enumerate(samples)]
    return rows


FIXTURE = (
    _rows("A", "p1", True, [True, False, False, True])
    + _rows("A", "p2", False, [False, False, False, False])
    + _rows("B", "q1", True, [True, True, True, True])
    + _rows("A", "p1", True, [True, True, True, True], guided=True)
)


def test_summary_hand_computed():
    s = summarize(FIXTURE, ks=(1, 2, 8))
    a = s["benchmarks"]["A"]
    assert a["problems"] == 2 and a["unscorable"] == 0
    assert a["pass1_greedy"] == 0.5
    assert a["pass1_mean"] == pytest.approx((2 / 4 + 0) / 2)
    # p1: n=4, c=2: pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6; p2: 0.
    assert a["pass2"] == pytest.approx((1 - 1 / 6) / 2)
    assert a["pass1"] == pytest.approx(a["pass1_mean"])
    assert "pass8" not in a  # k > n is not reported
    # greedy values [1, 0]: sample sd 0.7071, half-width 1.96 * 0.7071 / sqrt(2) = 0.98
    assert a["pass1_greedy_ci95"] == pytest.approx(1.959964 * math.sqrt(0.5) / math.sqrt(2))
    assert s["benchmarks"]["B"]["pass1_greedy"] == 1.0 and s["benchmarks"]["B"]["pass1_greedy_ci95"] == 0.0
    assert s["macro"]["pass1_greedy"] == pytest.approx(0.75)  # mean of 0.5 and 1.0
    assert s["micro"]["pass1_greedy"] == pytest.approx(2 / 3)  # 2 of 3 problems
    guided = summarize(FIXTURE, ks=(1,), guided=True)
    assert guided["micro"]["problems"] == 1 and guided["micro"]["pass1_mean"] == 1.0
    table = markdown_table(s, title="tiny")
    assert "| tiny | A | B | macro avg | micro avg |" in table
    assert "| pass@1 (greedy) | 50.0 ± 98.0 | 100.0 ± 0.0 | 75.0 | 66.7 ± " in table
    assert "| pass@2 |" in table


def test_mean_ci_edge_cases():
    assert math.isnan(mean_ci([])[0])
    assert mean_ci([0.3]) == (0.3, 0.0)


def test_problem_stats_orders_samples_and_marks_errors():
    rows = _rows("A", "p", False, [True, False])
    rows[1]["error"] = "prompt too long"
    stats = problem_stats(rows[::-1])  # order in the file does not matter
    p = stats[("A", "p", False)]
    assert p.first == (True, False) and p.n == 2 and p.c == 1 and p.unscorable


def _eval(tmp_path, *extra):
    out = tmp_path / "eval"
    args = ["eval", str(TINY_CONF), *SMALL, f"run.output_dir={tmp_path}", "--out", str(out), "--no-progress", *extra]
    assert main(args) == 0
    return out


def test_eval_builtin_with_hints_and_resume(tmp_path, capsys):
    out = _eval(tmp_path, "--n", "4", "--k", "1", "4", "--limit", "8", "--with-hints")
    result = json.loads((out / "results.json").read_text())
    unguided, guided = result["unguided"]["micro"], result["guided"]["micro"]
    assert unguided["problems"] == guided["problems"] == 8
    # The warm-started policy: with hints it solves everything it is given.
    assert guided["pass1_greedy"] == 1.0
    assert unguided["pass4"] >= unguided["pass1_mean"]
    assert "pass@4" in (out / "results.md").read_text()
    rows = read_samples(out / "samples.jsonl")
    assert len(rows) == 8 * 2 * 5  # 8 problems, plain + hinted, greedy + 4 samples
    # Rerun: nothing is regenerated. Cut the file (a kill mid-run): only the missing part is.
    assert main(["eval", str(TINY_CONF), *SMALL, f"run.output_dir={tmp_path}", "--out", str(out), "--no-progress", "--n", "4", "--limit", "8", "--with-hints"]) == 0
    assert len(read_samples(out / "samples.jsonl")) == 80
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text("\n".join(lines[:37]) + "\n")
    _eval(tmp_path, "--n", "4", "--limit", "8", "--with-hints")
    again = read_samples(out / "samples.jsonl")
    assert len(again) == 80
    assert {(r["id"], r["sample"], r["guided"]) for r in again} == {(r["id"], r["sample"], r["guided"]) for r in rows}


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="needs ../shared/data/benchmarks")
def test_eval_shared_benchmarks_on_tiny_policy(tmp_path):
    out = _eval(
        tmp_path, "--n", "4", "--limit", "20", "--k", "1", "4",
        "--benchmark", f"gsm8k={BENCHMARKS / 'gsm8k.jsonl'}", "--benchmark", f"math500={BENCHMARKS / 'math500.jsonl'}",
    )
    result = json.loads((out / "results.json").read_text())
    per = result["unguided"]["benchmarks"]
    assert set(per) == {"gsm8k", "math500"}
    assert per["gsm8k"]["problems"] == per["math500"]["problems"] == 20
    # The character-level tiny policy (context 128) cannot take most benchmark prompts:
    # they are scored 0 and counted, never dropped.
    rows = read_samples(out / "samples.jsonl")
    assert len(rows) == 2 * 20 * 5
    errors = [r for r in rows if r.get("error")]
    assert all(not r["correct"] for r in errors)
    assert per["gsm8k"]["unscorable"] + per["math500"]["unscorable"] == len({(r["benchmark"], r["id"]) for r in errors})
    assert "could not take" in (out / "results.md").read_text()


# -- samples are reused only from the same model, weights, prompt and settings ------------------------


def _checkpoint(tmp_path):
    """A checkpoint of the tiny policy with other weights than the warm start's."""
    import torch
    from safetensors.torch import save_model

    from conftest import tiny_config
    from nemo_guide.cli import make_backend

    backend = make_backend(tiny_config(tmp_path))
    with torch.no_grad():
        next(backend.model.parameters()).add_(0.01)
    ckpt = tmp_path / "ckpt" / "step_000001"
    ckpt.mkdir(parents=True)
    save_model(backend.model, str(ckpt / "model.safetensors"))
    return ckpt


def test_eval_of_a_checkpoint_refuses_the_warm_starts_samples(tmp_path, capsys):
    import hashlib

    out = _eval(tmp_path, "--n", "2", "--limit", "4")
    before = (out / "samples.jsonl").read_text()
    ckpt = _checkpoint(tmp_path)
    args = ["eval", str(TINY_CONF), *SMALL, f"checkpoint={ckpt}", "--out", str(out), "--n", "2", "--limit", "4", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds samples of another evaluation" in err
    assert f"model: 'builtin:tiny' in 12 row(s); this evaluation: '{ckpt}'" in err
    assert "weights_sha256: " in err and "temperature" not in err
    assert "--fresh to start over" in err and "--out another directory" in err
    assert (out / "samples.jsonl").read_text() == before  # nothing written
    # --fresh: the old samples are kept aside, and the results name the checkpoint and its weights
    assert main([*args, "--fresh"]) == 0
    (old,) = out.glob("samples.jsonl.old-*")
    assert old.read_text() == before
    result = json.loads((out / "results.json").read_text())
    sha = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert result["model"] == str(ckpt) and result["backend_model"] == "builtin:tiny" and result["weights_sha256"] == sha
    assert result["benchmarks"] == {"digit_ops": {"source": "builtin:digit_ops", "problems": 4}}
    rows = read_samples(out / "samples.jsonl")
    assert len(rows) == 12 and {(r["model"], r["weights_sha256"]) for r in rows} == {(str(ckpt), sha)}


def test_eval_with_another_temperature_or_prompt_refuses_old_samples(tmp_path, capsys):
    out = _eval(tmp_path, "--n", "2", "--limit", "4", "--with-hints")
    capsys.readouterr()
    args = ["eval", str(TINY_CONF), *SMALL, f"run.output_dir={tmp_path}", "--out", str(out), "--n", "2", "--limit", "4", "--no-progress"]
    assert main([*args, "--temperature", "5.0"]) == 2
    err = capsys.readouterr().err
    assert "temperature: 1.0 in 24 row(s); this evaluation: 5.0" in err and "model:" not in err
    assert main([*args, "--with-hints", "data.hint_template=Hint {hint} then {problem}"]) == 2
    err = capsys.readouterr().err
    assert "prompt_sha256: 12 row(s) were generated from another prompt text" in err and "with hint" in err
    # the same settings resume; reading the file back names them
    assert main([*args, "--with-hints"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["temperature"] == 1.0 and result["max_new_tokens"] == 64 and result["seed"] == 0 and result["n"] == 2


def test_eval_refuses_k_larger_than_n(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(TINY_CONF), "--n", "4", "--k", "1", "8", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--k 1 8 with --n 4: pass@k needs k samples per problem (1 <= k <= n); raise --n to 8" in err
    assert not out.exists()


# -- every batch is written as soon as it is scored ----------------------------------------------------


class Killed(Exception):
    """Stands for a kill -9 in the middle of an evaluation."""


class CountingReward:
    """The exact-match verifier, counting the samples it scores; raises ``Killed`` on call ``die_at``."""

    def __init__(self, die_at=None):
        from nemo_guide.rewards import make_reward

        self.inner, self.calls, self.scored, self.die_at = make_reward("exact"), 0, 0, die_at

    def __call__(self, prompts, completions, *, answers):
        self.calls += 1
        if self.calls == self.die_at:
            raise Killed
        self.scored += len(completions)
        return self.inner(prompts, completions, answers=answers)

    def close(self):
        self.inner.close()


def test_a_killed_eval_keeps_finished_samples_and_a_rerun_does_only_the_rest(tmp_path, tiny_cfg):
    from nemo_guide.cli import make_backend
    from nemo_guide.evaluation import SamplingSpec, evaluate_benchmarks, load_benchmarks
    from nemo_guide.prompts import PromptSettings
    from nemo_guide.samples import SampleSource

    cfg = tiny_cfg()
    backend = make_backend(cfg)
    benchmarks = load_benchmarks([], cfg.data.train, cfg.data.eval, 6)
    spec = SamplingSpec(n=3, temperature=1.0)
    source = SampleSource("builtin:tiny", "builtin:tiny", "0" * 64, 1.0, 1.0, 64, 0)

    def run(out, reward, logs):
        settings = PromptSettings.from_config(cfg)
        return evaluate_benchmarks(backend, backend, benchmarks, reward, spec, settings, out, source=source, batch_size=4, progress=False, log=logs.append)

    # 6 problems x (greedy + 3 samples) = 24 samples in 6 batches of 4; the 4th batch's scoring dies.
    logs = []
    with pytest.raises(Killed):
        run(tmp_path / "a", CountingReward(die_at=4), logs)
    assert len(read_samples(tmp_path / "a" / "samples.jsonl")) == 12
    assert logs[0].startswith("eval: 24 of 24 samples to generate")
    assert any(line.startswith("eval: 4/24 samples (16%)") for line in logs)
    logs, reward = [], CountingReward()
    run(tmp_path / "a", reward, logs)
    assert reward.scored == 12 and "(12 already there)" in logs[0] and logs[-1].startswith("eval: 12/12 samples (100%)")
    resumed = read_samples(tmp_path / "a" / "samples.jsonl")
    # batches have fixed members and seeds: the resumed file equals an uninterrupted run's
    run(tmp_path / "b", CountingReward(), [])
    uninterrupted = read_samples(tmp_path / "b" / "samples.jsonl")
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert sorted(resumed, key=key) == sorted(uninterrupted, key=key)


def test_eval_of_a_missing_checkpoint_or_model_is_one_line(tmp_path, capsys):
    base = ["eval", str(TINY_CONF), "--out", str(tmp_path / "e"), "--no-progress", "--limit", "2"]
    assert main([*base, f"checkpoint={tmp_path / 'nope'}"]) == 2
    assert f"checkpoint={tmp_path / 'nope'}: no model.safetensors in it" in capsys.readouterr().err
    assert main([*base, "backend.model=builtin:huge"]) == 2
    assert "backend.model = 'builtin:huge': unknown built-in model; choose one of builtin:tiny" in capsys.readouterr().err
    assert main([*base, f"backend.model={tmp_path}"]) == 2
    assert "no safetensors weights there" in capsys.readouterr().err
