"""nemo-guide data prepare: OpenR1-style rows in, records out, every drop counted and kept aside."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from nemo_guide.cli import main
from nemo_guide.data.records import load_records
from nemo_guide.prepare import prepare

ROWS = [
    {"uuid": "u1", "problem": "What is 1+1?", "solution": "1+1=2, so \\boxed{2}.", "answer": "2", "source": "amc"},
    {"uuid": "u2", "problem": "Half of one?", "solution": "...", "answer": "\\frac{1}{2}"},
    # A word parses as a symbol in math-verify, so it is kept (it can still be matched).
    {"uuid": "u3", "problem": "Name it.", "solution": "...", "answer": "proof"},
    {"uuid": "u4", "problem": "No answer", "solution": "...", "answer": None},
    {"uuid": "u5", "problem": "", "solution": "...", "answer": "3"},
    {"uuid": "u1", "problem": "dup", "solution": "...", "answer": "4"},
    {"uuid": "u6", "problem": "Unbalanced", "solution": "...", "answer": "\\frac{1}{"},
    {"problem": "No id", "solution": "...", "answer": 7},
]


def test_prepare_jsonl(tmp_path):
    src = tmp_path / "openr1.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n{broken\n")
    out = tmp_path / "records.jsonl"
    summary = prepare(src, out, workers=1)
    records = {r.id: r for r in load_records(out)}
    assert set(records) == {"u1", "u2", "u3", "openr1-7"}
    assert records["u1"].solution.endswith("\\boxed{2}.") and records["u1"].extra == {"uuid": "u1", "source": "amc"}
    assert records["openr1-7"].answer == "7"
    reasons = summary["dropped_by_reason"]
    assert reasons["missing answer"] == 1 and reasons["missing problem"] == 1
    assert reasons["duplicate id"] == 1 and reasons["not a JSON object"] == 1
    assert "\\frac{1}{" in summary["examples"]["answer not usable by the verifier"]
    assert summary["kept"] + summary["dropped"] == len(ROWS) + 1
    dropped = [json.loads(line) for line in (tmp_path / "records.jsonl.dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == summary["dropped"]


def test_prepare_parquet_via_cli(tmp_path, capsys):
    src = tmp_path / "openr1.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), src)
    assert main(["data", "prepare", str(src), str(tmp_path / "r.jsonl"), "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 2
