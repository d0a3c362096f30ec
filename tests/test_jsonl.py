"""The one JSONL reader (nemo_guide.data.jsonl), its bad-line policy, and every caller using it."""

import ast
import json
from pathlib import Path

import pytest

from nemo_guide.data import DataError, JsonlError, prepare_append, read_jsonl
from nemo_guide.data.jsonl import BadLine, TornTail

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_guide"


def _bytes(path, data: bytes):
    path.write_bytes(data)
    return path


# A file with every kind of line: 1 good, 2 blank, 3 invalid JSON, 4 good, 5 an array,
# 6 invalid UTF-8 (0xff is the 9th byte), 7 a number, 8 good, no final newline.
MIXED = b'{"a": 1}\n\n{"a": 2\n{"a": 4}\n[1, 2]\n{"a": "\xff"}\n7\n{"a": 8}'


def test_raise_lists_every_bad_line_with_file_line_what_and_fix(tmp_path):
    path = _bytes(tmp_path / "m.jsonl", MIXED)
    with pytest.raises(JsonlError) as info:
        read_jsonl(path)
    err = info.value
    assert isinstance(err, DataError) and isinstance(err, ValueError)
    assert [(b.line, b.where) for b in err.bad] == [(3, f"{path}:3"), (5, f"{path}:5"), (6, f"{path}:6"), (7, f"{path}:7")]
    assert str(err) == (
        f"{path}: 4 bad line(s); repair or delete them:\n"
        f"  {path}:3: not valid JSON (Expecting ',' delimiter at column 8); each line must be one JSON object\n"
        f"  {path}:5: expected a JSON object, got an array\n"
        f"  {path}:6: not valid UTF-8 (byte 0xff at byte 8 of the line); save the file as UTF-8\n"
        f"  {path}:7: expected a JSON object, got a number"
    )


def test_skip_returns_rows_with_line_numbers_and_the_skipped_lines(tmp_path):
    path = _bytes(tmp_path / "m.jsonl", MIXED)
    read = read_jsonl(path, on_bad="skip")
    # Blank line 2 is neither a row nor a bad line, but it is counted in the numbering.
    assert read.rows == [(1, {"a": 1}), (4, {"a": 4}), (8, {"a": 8})]
    assert read.objects() == [{"a": 1}, {"a": 4}, {"a": 8}]
    assert [b.line for b in read.skipped] == [3, 5, 6, 7]
    assert read.skipped_summary() == f"4 bad line(s) skipped: {path}:3, {path}:5, {path}:6, {path}:7"
    assert read.torn is None  # not an append-only read: a bad final line would be a bad line
    assert [line for line, _ in read.in_order()] == [1, 3, 4, 5, 6, 7, 8]
    assert isinstance(read.in_order()[1][1], BadLine)
    assert read_jsonl(_bytes(tmp_path / "ok.jsonl", b'{"x": 1}\n')).skipped_summary() == ""


def test_what_names_the_expected_object(tmp_path):
    path = _bytes(tmp_path / "w.jsonl", b'"just a string"\nnull\ntrue\n')
    read = read_jsonl(path, on_bad="skip", what="a JSON object with fields id, problem, answer")
    assert [str(b) for b in read.skipped] == [
        f"{path}:1: expected a JSON object with fields id, problem, answer, got a string",
        f"{path}:2: expected a JSON object with fields id, problem, answer, got null",
        f"{path}:3: expected a JSON object with fields id, problem, answer, got true/false",
    ]


def test_blank_lines_crlf_and_bom(tmp_path):
    path = _bytes(tmp_path / "b.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n  \r\n\t\n{"a": 2}\r\n\n')
    assert read_jsonl(path).rows == [(1, {"a": 1}), (4, {"a": 2})]
    assert read_jsonl(_bytes(tmp_path / "e.jsonl", b"")).rows == []
    assert read_jsonl(_bytes(tmp_path / "n.jsonl", b"\n \n")).rows == []


def test_line_separators_inside_strings_do_not_split_a_line(tmp_path):
    # str.splitlines() would cut these rows in two; JSONL lines end at \n only.
    row = {"hint": "a\u2028b\u0085c\x1cd"}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(path).objects() == [row]


def test_unknown_policy_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="on_bad = 'ignore': choose 'raise' or 'skip'"):
        read_jsonl(_bytes(tmp_path / "a.jsonl", b"{}\n"), on_bad="ignore")
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_long_lists_are_cut_with_a_count(tmp_path):
    path = _bytes(tmp_path / "many.jsonl", b"x\n" * 25)
    with pytest.raises(JsonlError) as info:
        read_jsonl(path)
    assert len(info.value.bad) == 25
    assert f"{path}:20: not valid JSON" in str(info.value) and f"{path}:21:" not in str(info.value)
    assert str(info.value).endswith("... and 5 more")


# --- torn final lines of append-only files -----------------------------------------


@pytest.mark.parametrize("tail", [b'{"step": 3, "x": 0.', b'{"t": "caf\xc3', b"{"], ids=["json", "utf8-mid-character", "one-byte"])
def test_torn_final_line_is_reported_apart_not_an_error(tmp_path, tail):
    path = _bytes(tmp_path / "metrics.jsonl", b'{"step": 1}\n\n{"step": 2}\n' + tail)
    read = read_jsonl(path, append_only=True)
    assert read.objects() == [{"step": 1}, {"step": 2}]
    assert read.skipped == []
    assert read.torn == TornTail(path, 4, 25, len(tail))
    assert str(read.torn).startswith(f"{path}:4: final line cut short ({len(tail)} bytes, no newline)")
    # A file that is not append-only has no torn lines: the same line is a bad line.
    with pytest.raises(JsonlError, match=f"{path}:4: not valid"):
        read_jsonl(path)


def test_final_line_without_newline_that_parses_is_a_row(tmp_path):
    path = _bytes(tmp_path / "f.jsonl", b'{"step": 1}\n{"step": 2}')
    for append_only in (False, True):
        read = read_jsonl(path, append_only=append_only)
        assert read.rows == [(1, {"step": 1}), (2, {"step": 2})] and read.torn is None


def test_bad_middle_line_of_append_only_file_is_an_error(tmp_path):
    path = _bytes(tmp_path / "samples.jsonl", b'{"s": 1}\n{"s": \n{"s": 3}\n{"s"')
    with pytest.raises(JsonlError) as info:
        read_jsonl(path, append_only=True)
    msg = str(info.value)
    assert [b.line for b in info.value.bad] == [2]
    assert f"{path}:2: not valid JSON (Expecting value at column 7)" in msg
    assert "only a final line cut short by an interrupted write is expected" in msg
    # Skipping still reports the torn tail apart from the bad line.
    read = read_jsonl(path, append_only=True, on_bad="skip")
    assert [b.line for b in read.skipped] == [2] and read.torn.line == 4


def test_prepare_append_cuts_a_torn_tail_then_appends_stay_valid(tmp_path):
    path = _bytes(tmp_path / "out.jsonl", b'{"id": 1}\n{"id": 2}\n{"id": 3, "hint": "caf\xc3')
    torn = prepare_append(path)
    assert torn == TornTail(path, 3, 20, 23)
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": 3}) + "\n")
    read = read_jsonl(path, append_only=True)
    assert read.objects() == [{"id": 1}, {"id": 2}, {"id": 3}] and read.torn is None
    assert prepare_append(path) is None and path.read_bytes().endswith(b'{"id": 3}\n')


def test_prepare_append_ends_a_complete_line_and_leaves_clean_files_alone(tmp_path):
    path = _bytes(tmp_path / "a.jsonl", b'{"id": 1}\n{"id": 2}')
    assert prepare_append(path) is None
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'  # else the next row would join line 2
    assert prepare_append(path) is None and path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    blank_tail = _bytes(tmp_path / "b.jsonl", b'{"id": 1}\n  ')
    assert prepare_append(blank_tail) is None and blank_tail.read_bytes() == b'{"id": 1}\n'
    empty = _bytes(tmp_path / "e.jsonl", b"")
    assert prepare_append(empty) is None and empty.read_bytes() == b""
    only_torn = _bytes(tmp_path / "t.jsonl", b'{"id')
    assert prepare_append(only_torn) == TornTail(only_torn, 1, 0, 4) and only_torn.read_bytes() == b""
    assert prepare_append(tmp_path / "missing.jsonl") is None
    assert not (tmp_path / "missing.jsonl").exists()


# --- callers ----------------------------------------------------------------------------


def test_read_metrics_and_metrics_logger_resume_after_a_torn_tail(tmp_path):
    from nemo_guide.tracking import METRICS_FILE, MetricsLogger, read_metrics

    path = tmp_path / METRICS_FILE
    rows = [{"step": s, "train/reward": s / 10} for s in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "train/rew', encoding="utf-8")
    assert read_metrics(tmp_path) == rows  # the torn step 4 was never logged
    logger = MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    logger.log(3, {"train/reward": 0.5})
    logger.close()
    assert read_jsonl(path).objects() == [*rows[:3], {"step": 3, "train/reward": 0.5}]
    # Without resume (appending to the file as it is), the torn tail is cut before the first row.
    path.write_text(json.dumps(rows[0]) + "\n" + '{"step": 1, "tr', encoding="utf-8")
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"train/reward": 0.25})
    logger.close()
    assert read_jsonl(path).objects() == [rows[0], {"step": 1, "train/reward": 0.25}]


def test_read_metrics_names_a_bad_middle_line(tmp_path):
    from nemo_guide.tracking import METRICS_FILE, read_metrics

    (tmp_path / METRICS_FILE).write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=f"{tmp_path / METRICS_FILE}:2: not valid JSON"):
        read_metrics(tmp_path)


def test_read_samples_ignores_a_torn_tail_and_names_a_bad_middle_line(tmp_path):
    from nemo_guide.evaluation import read_samples

    row = {"benchmark": "b", "id": "1", "sample": -1, "guided": False, "text": "x", "correct": True}
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row)[:17], encoding="utf-8")
    assert read_samples(path) == [row]
    assert read_samples(tmp_path / "none.jsonl") == []
    path.write_text(json.dumps(row) + "\n" + "\x00\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        read_samples(path)
    _bytes(path, json.dumps(row).encode() + b"\n\xfe\n")
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        read_samples(path)


# --- no JSONL parsing outside the reader ---------------------------------------------------

# Every json.load/json.loads in the package outside nemo_guide/data/jsonl.py, and why it is
# not a JSONL file read. A new call fails this test: read JSONL files with read_jsonl.
NOT_JSONL = {
    ("convert/nemo_file.py", "stored_hf_config"): "a Hugging Face config.json: one JSON document",
    ("aligner/trainer.py", "resume_state"): "the Guide side file of a checkpoint: one JSON document",
    ("hintgen.py", "_post"): "the body of one HTTP reply",
    ("rewards/math.py", "VerifierPool._run"): "one protocol line from the verifier subprocess",
    ("rewards/_worker.py", "serve"): "one protocol line from the parent process",
    ("checkpoint.py", "read_checkpoint"): "state.json and config.json: one JSON document each",
    ("convert/shape.py", "read_hf_shape"): "a Hugging Face config.json",
    ("convert/hf_io.py", "load_hf_state_dict"): "a safetensors index JSON",
    ("backends/megatron/checkpoint.py", "megatron_to_hf_checkpoint"): "a Hugging Face config.json",
    ("backends/torch/tiny.py", "TinyConfig.from_json"): "a config string stored in safetensors metadata",
    ("backends/torch/tiny_llama.py", "save_tiny_llama"): "the config.json transformers just wrote",
    ("backends/torch/tiny_llama.py", "read_build"): "build.json: one JSON document",
    ("experiment/job.py", "read_document"): "a grid's job file, done.json or grid.json: one JSON document each",
}

# Appends to files that are not JSONL (no row can be torn): human-readable logs.
TEXT_APPENDS = {
    ("experiment/runner.py", "_launch"): "a job's stdout/stderr log, appended to on --resume",
}


def _calls(path: Path, names: set[str]) -> list[tuple[str, int, str, ast.Call]]:
    """``(enclosing qualname, line, called name, call node)`` per call of a function or method in ``names``."""
    found = []

    def walk(node, stack):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                walk(child, [*stack, child.name])
                continue
            if isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
                if name in names:
                    found.append((".".join(stack), child.lineno, name, child))
            walk(child, stack)

    walk(ast.parse(path.read_text(encoding="utf-8")), [])
    return found


def test_no_jsonl_parsing_outside_the_reader():
    seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "data/jsonl.py":
            continue
        source = path.read_text(encoding="utf-8")
        assert "from json import" not in source, f"{rel}: import json and call json.loads, so this test sees it"
        for where, line, name, call in _calls(path, {"loads", "load"}):
            func = call.func
            if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "json"):
                continue
            assert (rel, where) in NOT_JSONL, f"nemo_guide/{rel}:{line} ({where}) parses JSON itself; read JSONL files with nemo_guide.data.jsonl.read_jsonl"
            seen.add((rel, where))
    assert seen == set(NOT_JSONL), f"stale entries: {set(NOT_JSONL) - seen}"


def test_every_append_is_guarded_by_prepare_append():
    # A function that opens a file for appending cuts a torn tail first.
    appenders = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        calls = _calls(path, {"open", "prepare_append"})
        for where, line, name, call in calls:
            modes = [a.value for a in call.args if isinstance(a, ast.Constant)] + [k.value.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            if name == "open" and any(isinstance(m, str) and "a" in m and set(m) <= set("rwabxt+") for m in modes):
                appenders.add((rel, where))
                if (rel, where) in TEXT_APPENDS:
                    continue
                assert any(n == "prepare_append" and w == where and ln < line for w, ln, n, _ in calls), f"nemo_guide/{rel}:{line} appends without prepare_append first"
    assert appenders == {("tracking.py", "MetricsLogger.__init__"), ("evaluation.py", "evaluate_benchmarks"), ("hintgen.py", "generate_hints"), *TEXT_APPENDS}
