import json

import pytest

from nemo_guide.data import DEFAULT_HINT_TEMPLATE, DataError, Record, build_prompt, format_guided_prompt, load_records, write_records
from nemo_guide.data.templates import REASONING_SYSTEM_PROMPT


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_keeps_extra_fields(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"id": "a", "problem": "1+1?", "answer": "2", "hint": "count", "source": "x", "level": 3}),
        "",
        json.dumps({"id": 7, "problem": "2+2?", "answer": 4}),
    ])
    records = load_records(path)
    assert records[0] == Record(id="a", problem="1+1?", answer="2", hint="count", extra={"source": "x", "level": 3})
    assert records[1].id == "7" and records[1].answer == "4" and records[1].hint is None


def test_every_problem_is_reported_with_file_line_and_field(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [
        json.dumps({"id": "a", "problem": "p", "answer": "1"}),
        json.dumps({"id": "b", "answer": "1"}),
        "{not json",
        json.dumps({"id": "a", "problem": "q", "answer": "2"}),
        json.dumps({"id": "c", "problem": "q", "answer": "2", "hint": ""}),
        json.dumps({"id": "d", "problem": "q", "answer": ["2"]}),
    ])
    with pytest.raises(DataError) as info:
        load_records(path)
    msg = str(info.value)
    assert "5 problem(s)" in msg
    assert f"{path}:2: field 'problem' is missing" in msg
    assert f"{path}:3: not valid JSON" in msg
    assert f"{path}:4: duplicate id 'a' (first at {path}:1)" in msg
    assert f"{path}:5: field 'hint' is an empty string" in msg
    assert f"{path}:6: field 'answer' must be a string, got list" in msg


def test_records_report_bad_lines_with_field_problems_in_line_order(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"id": "a", "problem": "p", "answer": "1"}\n'
        b'{"id": "b", "problem": "caf\xe9", "answer": "1"}\n'  # Latin-1, not UTF-8
        b'{"id": "c", "answer": "1"}\n'
        b'["c", "p", "1"]\n'
        b'{"id": "d", "problem": "p",'
    )
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value) == (
        f"{path}: 4 problem(s):\n"
        f"  {path}:2: not valid UTF-8 (byte 0xe9 at byte 28 of the line); save the file as UTF-8\n"
        f"  {path}:3: field 'problem' is missing; every record needs id, problem, answer\n"
        f"  {path}:4: expected a JSON object with fields id, problem, answer, got an array\n"
        f"  {path}:5: not valid JSON (Expecting property name enclosed in double quotes at column 28); each line must be one JSON object"
    )


def test_parquet_roundtrip_and_row_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": ["x", "y"], "problem": ["p", "q"], "answer": ["1", "2"], "hint": ["h", None], "solution": [None, "s"]})
    pq.write_table(table, tmp_path / "d.parquet")
    records = load_records(tmp_path / "d.parquet")
    assert [r.id for r in records] == ["x", "y"] and records[0].hint == "h" and records[1].solution == "s"
    pq.write_table(pa.table({"id": ["x", "x"], "problem": ["p", "q"], "answer": ["1", "2"]}), tmp_path / "dup.parquet")
    with pytest.raises(DataError, match="row 1: duplicate id 'x'"):
        load_records(tmp_path / "dup.parquet")


def test_write_then_load(tmp_path):
    records = [Record("1", "p", "a", hint="h", extra={"k": [1, 2]}), Record("2", "q", "b", solution="s")]
    write_records(tmp_path / "out.jsonl", records)
    assert load_records(tmp_path / "out.jsonl") == records


def test_empty_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no records"):
        load_records(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataError, match="unknown dataset format '.csv'"):
        load_records(_write(tmp_path / "d.csv", ["id,problem"]))
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")


def test_default_guided_prompt_exact_text():
    got = format_guided_prompt("What is $x$ if $x^{2}=4$?", "1. Take a square root.")
    assert got == (
        "What is $x$ if $x^{2}=4$?\n"
        "A hint to the problem is provided below:\n"
        "[HINT_START]\n"
        "1. Take a square root.\n"
        "[HINT_END]\n"
        'Consider the hint but start your solution from scratch and do not directly reference the hint (e.g. avoid phrases like "using the hint").'
    )
    assert got == DEFAULT_HINT_TEMPLATE.format(problem="What is $x$ if $x^{2}=4$?", hint="1. Take a square root.")


def test_custom_template_braces_are_literal_and_single_pass():
    got = format_guided_prompt("show {hint} literally", "H", template="Q: {problem} \\frac{1}{2} Hint: {hint}")
    assert got == "Q: show {hint} literally \\frac{1}{2} Hint: H"
    with pytest.raises(ValueError, match=r"\{hint\} exactly once"):
        format_guided_prompt("p", "h", template="{problem} only")
    with pytest.raises(ValueError, match="hint is empty"):
        format_guided_prompt("p", "  ")


class FakeTokenizer:
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_prompt_styles_put_hint_inside_user_turn():
    plain = build_prompt("2+2?", "think_answer")
    assert plain.endswith("User: 2+2?\nAssistant:") and "<think> reasoning process here </think>" in plain
    guided = build_prompt("2+2?", "chat", hint="add", tokenizer=FakeTokenizer())
    assert guided.startswith(f"<system>{REASONING_SYSTEM_PROMPT}</system><user>2+2?\nA hint to the problem")
    assert guided.endswith("</user><assistant>")
    assert build_prompt("2+2?", "chat", tokenizer=FakeTokenizer(), system_prompt="") == "<user>2+2?</user><assistant>"
    assert build_prompt("2+2?") == "2+2?"
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_prompt("2+2?", "chat")
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'"):
        build_prompt("2+2?", "chatml")
