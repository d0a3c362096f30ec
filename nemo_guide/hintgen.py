"""Hint generation from reference solutions through an OpenAI-compatible chat-completions API.

``nemo-guide hints IN.jsonl OUT.jsonl --base-url URL --model NAME`` sends every record
with a ``solution`` to ``POST {base_url}/chat/completions`` with the tutor prompt of the
paper's Appendix G, checks the reply (3-5 numbered hints; the final answer not stated
verbatim) and appends the record with its ``hint`` to ``OUT.jsonl`` as soon as it is
done. A rerun skips the ids already in ``OUT.jsonl``, so a crash loses nothing finished.
Requests run concurrently (``concurrency``), retry with exponential backoff on 429, 5xx,
timeouts, connection errors and malformed replies (``Retry-After`` is honoured), and give
up after ``max_retries``; records that failed or were rejected go to
``OUT.jsonl.rejected.jsonl`` with the reason and are tried again on the next run. The API
key is read from an environment variable and never printed or written. A final line of
``OUT.jsonl`` cut short by a crash is cut off (its record is generated again, and
``torn_line_dropped`` counts it); any other bad line in it is an error naming file:line.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nemo_guide.data.errors import DataError, file_problems
from nemo_guide.data.jsonl import prepare_append, read_jsonl
from nemo_guide.data.records import Record, load_records
from nemo_guide.rewards.math import matching_braces

# Paper, Appendix G (the instruction given to GPT-4o).
TUTOR_PROMPT = (
    "You are an expert math tutor with years of experience helping students understand difficult concepts "
    "without solving problems for them. Your task is to analyze a math problem and its reference solution, then "
    "create a series of helpful hints that guide the student toward discovering the solution independently.\n"
    "[question]: {question}\n"
    "[reference_answer]: {reference_answer}\n"
    "When creating hints, follow these principles:\n"
    "- Start with conceptual hints that point to relevant mathematical principles\n"
    "- Progress to more specific strategic hints about approach\n"
    "- Offer guidance on potential roadblocks without revealing key steps\n"
    "- Never provide direct calculations or formulas that would bypass the student's own reasoning\n"
    "- Include 3-5 hints in ascending order of directness\n"
    "[guidance]:\n"
    "1. [Conceptual hint focusing on relevant mathematical principles]\n"
    "2. [Strategic hint about approach without revealing steps]\n"
    "3. [Hint addressing common misconception or roadblock]\n"
    "4. [More direct hint if needed]\n"
    "5. [Final hint that guides toward the solution method without providing it]"
)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+\S", re.MULTILINE)


@dataclass(frozen=True)
class HintClientConfig:
    base_url: str
    """e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (vLLM, SGLang, TensorRT-LLM serve)."""
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (unset: no Authorization header, for local servers)."""
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0
    backoff_s: float = 1.0
    """First retry delay; doubles per retry up to ``max_backoff_s``."""
    max_backoff_s: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 1024
    on_leak: str = "flag"
    """A reply that states the final answer: ``flag`` (keep, ``hint_flag`` set) or ``reject``."""

    def __post_init__(self) -> None:
        problems = []
        if not self.base_url.startswith(("http://", "https://")):
            problems.append(f"base_url = {self.base_url!r}: must start with http:// or https://")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            problems.append("concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")
        if self.on_leak not in ("flag", "reject"):
            problems.append(f"on_leak = {self.on_leak!r}: choose 'flag' or 'reject'")
        if problems:
            raise ValueError("; ".join(problems))


class HintRequestError(RuntimeError):
    """A request that failed for good (after retries, or a non-retryable status).

    ``attempts``: requests made for the record; ``retries`` = ``attempts - 1``.
    """

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts

    @property
    def retries(self) -> int:
        return self.attempts - 1


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''} ({n - 1} retr{'ies' if n != 2 else 'y'})"


# LaTeX that wraps or spaces an answer without changing it: unwrapped or blanked before matching.
_WRAPPER = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf)\s*\{")
_BLANK = re.compile(r"\\left\b|\\right\b|\\[,;:! ]|\\[()\[\]]|(?<!\\)\$|~")
# Edges of a verbatim answer. Anything else next to it (space, sentence punctuation, brackets,
# "=", a closing "$") ends it, so "is 5." and "$\frac{5}{6}$," state the answer. A word
# character, "^" or a brace continues a longer expression: 15, 5x, x_5, 2^5, \sqrt{5} and
# \frac{5}{6} do not state the answer 5. Next to a digit, a decimal point, a digit group
# (5,000) or a slash (5/6) continue the number.
_BEFORE = r"(?<![\w^{\\])"
_AFTER = r"(?![\w^}])"
_BEFORE_DIGIT = r"(?<!\.)(?<![0-9],)(?<![0-9]/)"
_AFTER_DIGIT = r"(?!\.[0-9])(?!,[0-9])(?!/[0-9])"


def _leak_text(text: str) -> str:
    """``text`` as the leak check reads it: ``\\boxed{x}``, ``\\text{x}`` (and ``\\fbox``,
    ``\\textbf``, ``\\textrm``, ``\\mathrm``, ``\\mathbf``) become `` x ``; math delimiters
    (``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``), ``\\left``/``\\right`` and spacing
    commands become spaces; ``\\dfrac``/``\\tfrac`` read as ``\\frac`` and ``\\%`` as ``%``;
    lower case."""
    chars = list(text)
    braces = matching_braces(text)
    for m in _WRAPPER.finditer(text):
        close = braces.get(m.end() - 1)
        if close is not None:
            chars[m.start() : m.end()] = " " * (m.end() - m.start())
            chars[close] = " "
    text = "".join(chars)
    text = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text).replace("\\%", "%")
    return _BLANK.sub(" ", text).lower()


def _answer_pattern(answer: str) -> re.Pattern[str] | None:
    """A regex for ``answer`` stated verbatim, or None for an empty answer.

    Whitespace is optional between the answer's characters (``\\frac{5} {6}``, ``5 cm``)
    except inside a run of digits or of letters: ``1 2`` is not ``12``.
    """
    gold = " ".join(_leak_text(answer).split()).rstrip(".")
    if not gold.strip():
        return None
    parts = [re.escape(gold[0])]
    for a, b in zip(gold[:-1], gold[1:], strict=True):
        if b == " ":
            continue
        joined = a == "\\" or (a.isdigit() and b.isdigit()) or (a.isalpha() and b.isalpha())
        parts.append(("" if joined else r"\s*") + re.escape(b))
    before = _BEFORE + (_BEFORE_DIGIT if gold[0].isdigit() else "")
    after = _AFTER + (_AFTER_DIGIT if gold[-1].isdigit() else "")
    return re.compile(before + "".join(parts) + after)


def check_hint(text: str, answer: str) -> tuple[str, str | None]:
    """``(status, reason)``: ``ok``; ``bad_format`` (not 3-5 hints numbered 1..n); ``leak``
    (the final answer appears verbatim outside the hint numbers).

    Verbatim means: as a whole token after :func:`_leak_text` (so inside ``$...$``,
    ``\\boxed{}``, with trailing punctuation or other spacing), not as part of a longer
    number or expression (``15``, ``5.5``, ``0.5``, ``5,000``, ``5/6``, ``x^5``,
    ``\\frac{5}{6}`` do not state the answer ``5``).
    """
    numbers = [int(m.group(1)) for m in _NUMBERED.finditer(text)]
    if not 3 <= len(numbers) <= 5 or numbers != list(range(1, len(numbers) + 1)):
        return "bad_format", f"expected 3-5 hints numbered 1..n, found numbering {numbers}"
    body = _leak_text(_NUMBERED.sub(lambda m: m.group(0)[-1], text))
    pattern = _answer_pattern(answer)
    if pattern is not None and pattern.search(body):
        return "leak", f"states the final answer {answer!r}"
    return "ok", None


def _post(cfg: HintClientConfig, payload: dict[str, Any], key: str | None) -> dict[str, Any]:
    request = urllib.request.Request(
        cfg.base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(payload).encode("utf-8"),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
        return json.loads(response.read().decode("utf-8"))


def request_hint(cfg: HintClientConfig, record: Record, key: str | None, sleep: Callable[[float], None] = time.sleep) -> tuple[str, int]:
    """The reply text for ``record`` and the number of retries it took (requests made - 1).

    Raises:
        HintRequestError: after ``cfg.max_retries`` retries, or at once on a status that is
            not retried; its message and ``attempts`` count every request made.
    """
    prompt = TUTOR_PROMPT.replace("{question}", record.problem).replace("{reference_answer}", record.solution or "")
    payload = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}], "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    delay = cfg.backoff_s
    last = ""
    for attempt in range(cfg.max_retries + 1):
        retry_after = None
        try:
            body = _post(cfg, payload, key)
            content = body["choices"][0]["message"]["content"]
            if not isinstance(content, str) or not content.strip():
                raise ValueError("empty content")
            return content, attempt
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code not in RETRY_STATUS:
                raise HintRequestError(f"{last} is not retried; gave up after {_attempts(attempt + 1)}", attempt + 1) from None
            header = exc.headers.get("Retry-After") if exc.headers else None
            if header is not None:
                try:
                    retry_after = float(header)
                except ValueError:
                    retry_after = None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last = f"connection: {getattr(exc, 'reason', exc)}"
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            last = f"malformed reply: {type(exc).__name__}"
        if attempt < cfg.max_retries:
            sleep(min(cfg.max_backoff_s, retry_after if retry_after is not None else delay))
            delay = min(cfg.max_backoff_s, delay * 2)
    raise HintRequestError(f"gave up after {_attempts(cfg.max_retries + 1)}; last error: {last}", cfg.max_retries + 1)


def _done_ids(path: Path) -> set[str]:
    """Ids already in the output file. Its torn final line (a crash mid-write) does not
    count: that record is generated again. Any other bad line, or a row without an id, is
    a :class:`DataError` naming file:line."""
    if not path.is_file():
        return set()
    read = read_jsonl(path, append_only=True, what="a JSON object (a record with its hint)")
    no_id = [f"{path}:{line}: no 'id'; every row of a hints output is a finished record, id included" for line, row in read.rows if row.get("id") is None]
    if no_id:
        raise file_problems(path, no_id)
    return {str(row["id"]) for _, row in read.rows}


def generate_hints(records: Sequence[Record], out: Path, cfg: HintClientConfig, *, progress: bool = True, sleep: Callable[[float], None] = time.sleep) -> dict[str, int]:
    """Generate and append hints for every record not yet in ``out``; returns the counts.

    ``retries`` counts every retry made in this run, for records that succeeded, were
    rejected or failed alike: it equals the requests sent minus ``requested``.
    """
    out = Path(out)
    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    missing = [r.id for r in records if not r.solution]
    if missing:
        raise DataError(
            f"{len(missing)} record(s) have no 'solution' to derive a hint from, e.g. {missing[:5]}; "
            "add reference solutions or filter those records out first"
        )
    key = os.environ.get(cfg.api_key_env) or None
    done = _done_ids(out)
    todo = [r for r in records if r.id not in done]
    counts: Counter[str] = Counter(already_done=len(records) - len(todo), requested=len(todo))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="hints", unit="record", dynamic_ncols=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Both files are appended to: a torn final line (a crash mid-write) is cut off first.
    counts["torn_line_dropped"] = int(prepare_append(out) is not None)
    prepare_append(rejected_path)
    with out.open("a", encoding="utf-8") as ok_file, rejected_path.open("a", encoding="utf-8") as bad_file, ThreadPoolExecutor(cfg.concurrency) as pool:
        futures = {pool.submit(request_hint, cfg, r, key, sleep): r for r in todo}
        for future in as_completed(futures):
            record = futures[future]
            try:
                text, retries = future.result()
            except HintRequestError as exc:
                counts["failed"] += 1
                counts["retries"] += exc.retries
                bad_file.write(json.dumps({"id": record.id, "status": "failed", "reason": str(exc)}) + "\n")
                bad_file.flush()
            else:
                counts["retries"] += retries
                status, reason = check_hint(text, record.answer)
                if status == "bad_format" or (status == "leak" and cfg.on_leak == "reject"):
                    counts[f"rejected_{status}"] += 1
                    bad_file.write(json.dumps({"id": record.id, "status": status, "reason": reason, "reply": text}) + "\n")
                    bad_file.flush()
                else:
                    counts["flagged_leak" if status == "leak" else "ok"] += 1
                    row = {**record.to_dict(), "hint": text.strip()}
                    if status == "leak":
                        row["hint_flag"] = reason
                    ok_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                    ok_file.flush()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for name in ("ok", "flagged_leak", "rejected_bad_format", "rejected_leak", "failed", "retries"):
        counts.setdefault(name, 0)
    return dict(counts)


def run_hints(input_path: Path, out: Path, cfg: HintClientConfig, *, progress: bool = True) -> dict[str, int]:
    return generate_hints(load_records(input_path), out, cfg, progress=progress)
