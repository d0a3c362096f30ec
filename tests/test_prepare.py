"""nemo-guide data prepare: OpenR1-style rows in, records out, every drop counted and kept aside."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from nemo_guide.cli import main
from nemo_guide.data import read_jsonl
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


def test_prepare_drops_bad_lines_with_file_line_and_detail(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"problem": "1+1?", "answer": "2"}\n\xff\xfe\n[1]\n\n{"problem": "2+2?", "answer": "4"}\n'
    )
    summary = prepare(src, tmp_path / "out.jsonl", workers=1)
    assert summary["kept"] == 2 and summary["dropped_by_reason"] == {"not a JSON object": 2}
    assert summary["examples"]["not a JSON object"] == [f"{src}:2", f"{src}:3"]
    dropped = read_jsonl(tmp_path / "out.jsonl.dropped.jsonl").objects()
    assert [d["where"] for d in dropped] == [f"{src}:2", f"{src}:3"]
    assert dropped[0]["detail"].startswith("not valid UTF-8 (byte 0xff at byte 1")
    assert dropped[1]["detail"] == "expected a JSON object, got an array"
    # Default ids count rows as before, bad lines included and blank lines not: line 5 is in-3.
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl").objects()] == ["in-0", "in-3"]


def test_prepare_parquet_via_cli(tmp_path, capsys):
    src = tmp_path / "openr1.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), src)
    assert main(["data", "prepare", str(src), str(tmp_path / "r.jsonl"), "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 2
