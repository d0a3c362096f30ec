"""The benchmarks' shared subprocess plumbing (``benchmarks/_subprocess.py``): a child prints
the JSON its parent reads back, and a ``--before`` without a package is refused."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _subprocess import add_benchmark_arguments, parse_or_run_child, run_child

sys.path.pop(0)

SCRIPT = '''
import argparse, sys
sys.path.insert(0, {benchmarks!r})
from _subprocess import add_benchmark_arguments, parse_or_run_child

def run_one(x, threads):
    import os
    return {{"double": 2 * x, "omp": os.environ["OMP_NUM_THREADS"], "threads": threads}}

parser = argparse.ArgumentParser()
add_benchmark_arguments(parser, repeats_help="r", before_help="b")
parse_or_run_child(parser, run_one)
'''


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    add_benchmark_arguments(parser, repeats_help="r", before_help="b")
    return parser


def test_parent_gets_the_shared_options(monkeypatch, tmp_path):
    (tmp_path / "nemo_guide").mkdir()
    monkeypatch.setattr(sys, "argv", ["bench", "--rounds", "5", "--threads", "2", "--before", str(tmp_path)])
    args = parse_or_run_child(_parser(), run_one=None)
    assert (args.rounds, args.repeats, args.threads, args.before) == (5, 3, 2, str(tmp_path))


def test_before_without_a_package_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "--before", str(tmp_path)])
    with pytest.raises(SystemExit):
        parse_or_run_child(_parser(), run_one=None)
    assert f"--before {tmp_path}: no nemo_guide package there" in capsys.readouterr().err


def test_child_prints_what_run_child_reads(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(SCRIPT.format(benchmarks=str(Path(__file__).resolve().parents[1] / "benchmarks")))
    out = run_child(str(script), {"x": 21, "threads": 3}, str(tmp_path), 3)
    assert out == {"double": 42, "omp": "3", "threads": 3}
