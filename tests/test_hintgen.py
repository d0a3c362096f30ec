"""nemo-guide hints against a chat-completions server on 127.0.0.1 that misbehaves on purpose."""

import dataclasses
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nemo_guide.cli import main
from nemo_guide.data import DataError, JsonlError, read_jsonl
from nemo_guide.data.records import Record, write_records
from nemo_guide.hintgen import HintClientConfig, _done_ids, check_hint, generate_hints

GOOD = "1. Think about parity.\n2. Consider small cases.\n3. Look for an invariant."


class Server:
    """Replies per problem text: a script of behaviours, one per request, the last repeating."""

    def __init__(self, scripts):
        self.scripts = scripts
        self.calls = Counter()
        self.auth = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                """Quiet: no request log on stderr."""

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.append(self.headers.get("Authorization"))
                prompt = body["messages"][0]["content"]
                pid = next(p for p in server.scripts if f"[question]: problem {p}\n" in prompt)
                script = server.scripts[pid]
                action = script[min(server.calls[pid], len(script) - 1)]
                server.calls[pid] += 1
                if action == "slow":
                    time.sleep(1.0)
                    action = GOOD
                if action in (429, 500, 400):
                    self.send_response(action)
                    if action == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                payload = b"{not json" if action == "malformed" else json.dumps({"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _records(ids):
    return [Record(i, f"problem {i}", "17", solution=f"solution of {i}, answer 17") for i in ids]


def _cfg(url, **kw):
    return HintClientConfig(base_url=url, model="tutor", api_key_env="TEST_HINT_KEY", concurrency=3, max_retries=3, timeout_s=0.5, backoff_s=0.01, **kw)


def test_check_hint():
    assert check_hint(GOOD, "17") == ("ok", None)
    assert check_hint("1. a\n2. b", "17")[0] == "bad_format"
    assert check_hint("1. a\n2. b\n3. c\n4. d\n5. e\n6. f", "17")[0] == "bad_format"
    assert check_hint("1. a\n3. b\n4. c", "17")[0] == "bad_format"
    assert check_hint("1. a\n2. b\n3. so the answer is $17$", "17")[0] == "leak"
    assert check_hint("1. a\n2. b\n3. try 170 or x_17", "17")[0] == "ok"  # not the answer as a token
    assert check_hint("1. think\n2. about\n3. it", "3")[0] == "ok"  # hint numbers are not the answer


def _hints(line):
    return f"1. Think about it.\n2. {line}\n3. Check small cases."


@pytest.mark.parametrize(
    "answer,line",
    [
        ("5", "The answer is 5."),  # issue 11: trailing sentence punctuation
        ("5", "The answer is 5"),
        ("5", "So x = 5, and then"),
        ("5", "x=5; done"),
        ("5", "It is (5)!"),
        ("5", "Reach $5$."),
        ("5", r"Reach \(5\)?"),
        ("5", r"Write \boxed{5}."),
        ("5", r"It is \text{5}: done"),
        ("5", "5 is what you get"),
        (r"\frac{5}{6}", r"You get \frac{5}{6}."),  # issue 11
        (r"\frac{5}{6}", r"You get $\dfrac{5}{6}$,"),
        (r"\frac{5}{6}", r"You get \boxed{\frac{5}{6}}"),
        (r"\frac{5}{6}", r"You get \frac{5} {6}"),
        (r"\frac{5}{6}", r"You get $\left(\frac{5}{6}\right)$"),
        ("17", "so the answer is $17$"),
        ("62.5", "it is 62.5."),
        (r"20\%", "about 20%."),
        ("20%", r"about $20\%$"),
        ("-3", "x = -3."),
        ("(2, 3)", "the point (2,3)."),
        (r"\sqrt{2}", r"it is \(\sqrt{2}\)."),
        (r"\text{(B)}", "choose (B)."),
        ("5 cm", "it is 5cm."),
        ("1,000", "it is 1,000."),
    ],
)
def test_check_hint_leaks(answer, line):
    assert check_hint(_hints(line), answer) == ("leak", f"states the final answer {answer!r}")


@pytest.mark.parametrize(
    "answer,line",
    [
        ("5", "Try 15 or 52"),
        ("5", "Try 5.5"),
        ("5", "Try 0.5 or .5"),
        ("5", "About 5,000 people"),
        ("5", "Take 5/6 or 1/5 of it"),
        ("5", "Expand x^5, 2^{5} and x_5"),
        ("5", r"Compare \frac{5}{6} and \sqrt{5}"),
        ("5", "Try 5x"),
        ("12", "Count 1 2 3"),
        ("17", "try 170 or x_17"),
        (r"\frac{5}{6}", r"Compare \frac{5}{61}"),
        (r"\frac{5}{6}", r"Compare 2\frac{5}{6}"),
        (r"\sqrt{2}", r"Compare \frac{1}{\sqrt{2}}"),
        ("62.5", "it is 62.55"),
        ("3", "Three is not the answer"),
    ],
)
def test_check_hint_non_leaks(answer, line):
    assert check_hint(_hints(line), answer) == ("ok", None)


def test_failures_retries_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_HINT_KEY", "sk-secret-123")
    server = Server({
        "ok": [GOOD],
        "rate": [429, 429, GOOD],
        "boom": [500, GOOD],
        "garbled": ["malformed", GOOD],
        "slow": ["slow", GOOD],
        "leaky": ["1. a\n2. b\n3. the answer is 17"],
        "short": ["1. only one\n2. two"],
        "dead": [500],
        "bad_request": [400],
    })
    try:
        out = tmp_path / "hinted.jsonl"
        records = _records(list(server.scripts))
        counts = generate_hints(records, out, _cfg(server.url), progress=False)
        assert counts["ok"] == 5 and counts["flagged_leak"] == 1 and counts["torn_line_dropped"] == 0
        assert counts["rejected_bad_format"] == 1 and counts["failed"] == 2
        assert counts["retries"] == sum(server.calls.values()) - counts["requested"] == 2 + 1 + 1 + 1 + 3  # 2 x 429, 500, malformed, timeout, dead
        rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert set(rows) == {"ok", "rate", "boom", "garbled", "slow", "leaky"}
        assert rows["ok"]["hint"] == GOOD and rows["ok"]["solution"] == "solution of ok, answer 17"
        assert "hint_flag" in rows["leaky"] and "hint_flag" not in rows["ok"]
        rejected = [json.loads(line) for line in (tmp_path / "hinted.jsonl.rejected.jsonl").read_text().splitlines()]
        assert {r["id"]: r["status"] for r in rejected} == {"short": "bad_format", "dead": "failed", "bad_request": "failed"}
        assert server.calls["bad_request"] == 1  # a 400 is not retried
        assert server.calls["dead"] == 4  # 1 + max_retries
        assert set(server.auth) == {"Bearer sk-secret-123"}
        assert "sk-secret" not in out.read_text() + (tmp_path / "hinted.jsonl.rejected.jsonl").read_text()
        # Rerun: finished ids are not requested again; unfinished ones are.
        before = Counter(server.calls)
        counts = generate_hints(records, out, _cfg(server.url), progress=False)
        assert counts["already_done"] == 6 and counts["requested"] == 3
        assert all(server.calls[i] == before[i] for i in rows)
        # A crash mid-write leaves a cut line: that record is generated again, nothing else.
        text = out.read_text()
        out.write_text(text[: text.rindex("{") + 10])
        counts = generate_hints(records, out, _cfg(server.url, on_leak="reject"), progress=False)
        assert counts["already_done"] == 5 and counts["torn_line_dropped"] == 1
        # The cut line was removed before appending: the file is valid JSONL, one row per id.
        ids = [r["id"] for r in read_jsonl(out).objects()]
        assert sorted(ids) == sorted(set(ids)) and set(ids) >= set(rows) - {"leaky"}
    finally:
        server.close()


def test_hint_output_done_ids(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a", "hint": "h"}\n{"id": 7}\n{"id": "c", "hi')
    assert _done_ids(path) == {"a", "7"}  # the torn "c" is generated again
    path.write_bytes(b'{"id": "a"}\n{"hint": "h"}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=f"{path}:2: no 'id'"):
        _done_ids(path)
    path.write_bytes(b'{"id": "a"}\n{"id": "b"\n{"id": "c"}\n')
    with pytest.raises(JsonlError, match=f"{path}:2: not valid JSON"):
        _done_ids(path)


def test_records_without_solution_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="no 'solution'.*'b'"):
        generate_hints([*_records(["a"]), Record("b", "p", "1")], tmp_path / "o.jsonl", _cfg("http://127.0.0.1:9"), progress=False)


def test_cli_hints(tmp_path, capsys):
    server = Server({"x": [GOOD]})
    try:
        src = tmp_path / "in.jsonl"
        write_records(src, _records(["x"]))
        rc = main(["hints", str(src), str(tmp_path / "out.jsonl"), "--base-url", server.url, "--model", "m", "--no-progress"])
        assert rc == 0
        assert json.loads(capsys.readouterr().out)["ok"] == 1
    finally:
        server.close()


def test_on_leak_reject_catches_an_answer_before_punctuation(tmp_path):
    server = Server({"a": ["1. Think.\n2. The answer is 17.\n3. Check."], "b": [GOOD]})
    try:
        out = tmp_path / "out.jsonl"
        counts = generate_hints(_records(["a", "b"]), out, _cfg(server.url, on_leak="reject"), progress=False)
        assert counts["rejected_leak"] == 1 and counts["ok"] == 1
        assert [r["id"] for r in read_jsonl(out).objects()] == ["b"]
        rejected = [json.loads(line) for line in (tmp_path / "out.jsonl.rejected.jsonl").read_text().splitlines()]
        assert [(r["id"], r["status"]) for r in rejected] == [("a", "leak")]
    finally:
        server.close()


def test_retry_counts_are_the_retries_made(tmp_path):
    """Issue 11 (21): `retries` counted successes only, so a run whose failures "gave up after
    2 attempts" reported `retries: 0`. Now every retry counts: requests sent - records requested."""
    server = Server({"dead": [500], "rate": [429, GOOD], "garbled": ["malformed", "malformed", GOOD], "bad": [500, 400], "ok": [GOOD]})
    try:
        cfg = dataclasses.replace(_cfg(server.url), max_retries=2)
        counts = generate_hints(_records(list(server.scripts)), tmp_path / "out.jsonl", cfg, progress=False)
        assert counts["failed"] == 2 and counts["ok"] == 3
        # dead: 3 requests, rate: 2, garbled: 3, bad: 2 (the 400 is not retried), ok: 1
        assert dict(server.calls) == {"dead": 3, "rate": 2, "garbled": 3, "bad": 2, "ok": 1}
        assert counts["retries"] == sum(server.calls.values()) - counts["requested"] == 2 + 1 + 2 + 1
        reasons = {r["id"]: r["reason"] for r in map(json.loads, (tmp_path / "out.jsonl.rejected.jsonl").read_text().splitlines())}
        assert reasons == {
            "dead": "gave up after 3 attempts (2 retries); last error: HTTP 500",
            "bad": "HTTP 400 is not retried; gave up after 2 attempts (1 retry)",
        }
    finally:
        server.close()
