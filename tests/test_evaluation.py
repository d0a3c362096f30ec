"""nemo-guide eval: hand-computed summaries, and the command end to end on the tiny policy."""

import json
import math

import pytest

from conftest import BENCHMARKS, SMALL, TINY_CONF
from nemo_guide.cli import main
from nemo_guide.evaluation import markdown_table, mean_ci, problem_stats, read_samples, summarize


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
