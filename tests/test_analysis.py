"""nemo-guide analyze on a constructed fixture with hand-computed counts."""

import json
import warnings

import pytest

from nemo_guide.analysis import analyze, bootstrap_curve, plot_curves
from nemo_guide.cli import main
from nemo_guide.data.errors import DataError
from nemo_guide.errors import RunError


def _write(path, problems):
    """problems: {id: (greedy, [samples...], [guided samples...] or None)}"""
    with path.open("w") as f:
        for pid, (greedy, samples, guided) in problems.items():
            f.write(json.dumps({"benchmark": "b", "id": pid, "sample": -1, "guided": False, "text": "", "correct": greedy}) + "\n")
            for i, c in enumerate(samples):
                f.write(json.dumps({"benchmark": "b", "id": pid, "sample": i, "guided": False, "text": "", "correct": c}) + "\n")
            for i, c in enumerate(guided or []):
                f.write(json.dumps({"benchmark": "b", "id": pid, "sample": i, "guided": True, "text": "", "correct": c}) + "\n")


F, T = False, True
BEFORE = {
    # unsolved greedy, one of the first 2 samples right -> distillation if solved after
    "d1": (F, [F, T, F, F], [T, T, T, T]),
    # unsolved greedy, right only at sample 3 (index 3): pass@2 no, pass@4 yes
    "d2": (F, [F, F, F, T], [T, F, T, T]),
    # never right -> capability gain if solved after
    "c1": (F, [F, F, F, F], [T, T, F, T]),
    # unsolved and stays unsolved
    "u1": (F, [F, F, F, F], [F, F, F, F]),
    # solved at init, lost after -> regression
    "r1": (T, [T, T, F, T], None),
    # solved and kept
    "s1": (T, [T, T, T, T], None),
}
AFTER = {"d1": (T, [], None), "d2": (T, [], None), "c1": (T, [], None), "u1": (F, [], None), "r1": (F, [], None), "s1": (T, [], None), "extra": (T, [], None)}


def test_hand_computed_decomposition(tmp_path):
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    _write(before, BEFORE)
    _write(after, AFTER)
    r = analyze(before, after, k=2, rounds=200)
    assert r["problems"] == 6 and r["only_after"] == 1 and r["only_before"] == 0
    # progress: d1, d2, c1 (unsolved -> solved) = 3; with k=2 only d1 has pass@k: distillation 1, capability 2.
    assert r["effective"]["counts"] == {
        "problems": 6, "unsolved_init": 4, "progress": 3, "distillation": 1, "capability_gain": 2, "regression": 1, "net": 2}
    # Expected over draws of k=2 of n=4: d1 (c=1): 1 - C(3,2)/C(4,2) = 0.5; d2 likewise 0.5; c1: 0 -> 1.0.
    assert r["effective"]["expected"]["distillation"] == pytest.approx(1.0)
    # pass@k curve of the initial policy over 6 problems, n=4:
    # k=1: (1/4 + 1/4 + 0 + 0 + 3/4 + 1) / 6
    assert r["pass_at_k_before"][0] == pytest.approx((0.25 + 0.25 + 0.75 + 1) / 6)
    assert r["pass_at_k_before"][3] == pytest.approx(4 / 6)
    # Figure 2 subsets (k=2): capability gain {d2, c1}, distillation {d1}.
    cg = r["curves"]["capability_gain"]
    assert cg["problems"] == 2
    assert cg["unguided"]["curve"][0] == pytest.approx((0.25 + 0) / 2)
    assert cg["guided"]["curve"][0] == pytest.approx((0.75 + 0.75) / 2)
    assert r["curves"]["distillation"]["guided"]["curve"][0] == 1.0
    # With k=4, d2 becomes distillation too.
    assert analyze(before, after, k=4, rounds=10)["effective"]["counts"]["distillation"] == 2


def test_errors_name_the_fix(tmp_path):
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    _write(before, BEFORE)
    _write(after, AFTER)
    with pytest.raises(RunError, match="--n >= 8"):
        analyze(before, after, k=8)
    other = tmp_path / "other.jsonl"
    _write(other, {"zz": (T, [T], None)})
    with pytest.raises(DataError, match="no \\(benchmark, id\\) in common"):
        analyze(before, other, k=1)


def test_bootstrap_band_contains_the_mean():
    ns, cs = [4] * 20, [i % 5 for i in range(20)]
    lo, hi = bootstrap_curve(ns, cs, 4, rounds=300)
    assert all(a <= b for a, b in zip(lo, hi, strict=True))
    assert lo[0] <= sum(c / 4 for c in cs) / 20 <= hi[0]


def test_cli_analyze(tmp_path, capsys):
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    _write(before, BEFORE)
    _write(after, AFTER)
    assert main(["analyze", str(before), str(after), "--k", "2", "--bootstrap", "50", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| effective (k = 2) | 3 | 1 (1.0) | 2 (2.0) | 1 | 2 |" in out
    assert (tmp_path / "out" / "pass_at_k.png").stat().st_size > 5000
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["effective"]["k"] == 2


def test_cli_analyze_names_a_missing_file(tmp_path, capsys):
    before = tmp_path / "before.jsonl"
    _write(before, BEFORE)
    missing = tmp_path / "nope" / "samples.jsonl"
    assert main(["analyze", str(before), str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"samples file {missing} does not exist" in err and "in common" not in err


def test_cli_analyze_refuses_a_records_file_with_file_and_line(tmp_path, capsys):
    before = tmp_path / "before.jsonl"
    _write(before, BEFORE)
    records = tmp_path / "records.jsonl"
    records.write_text('{"id": "1", "problem": "1+1", "answer": "2"}\n\n{"id": "2", "problem": "2+2", "answer": "4"}\n')
    assert main(["analyze", str(before), str(records), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: 'benchmark'" not in err
    assert f"{records}:1: no 'benchmark', 'sample', 'guided', 'correct' field: not a samples file from `nemo-guide eval`" in err
    assert f"{records}:3:" in err and "records file" in err


def test_plot_of_an_empty_subset_does_not_warn(tmp_path):
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    _write(before, BEFORE)
    _write(after, AFTER)
    result = analyze(before, after, k=1, rounds=20)
    # k = 1: no first sample of a progressed problem is right, so the distillation subset is empty
    assert result["curves"]["distillation"] == {"problems": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        plot_curves(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5000
