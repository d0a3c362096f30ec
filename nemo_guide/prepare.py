"""``nemo-guide data prepare``: OpenR1-Math-style rows to the project's record schema.

Input rows (JSONL or Parquet) carry ``problem``, ``solution`` and ``answer`` (OpenR1-Math-220k
names; other fields are kept in ``extra``). The id is ``--id-field`` (``uuid`` in OpenR1)
when the row has it, else ``<file stem>-<row number>``. A row is dropped when it lacks a
problem or answer, or when the verifier cannot use its answer: ``\\boxed{answer}`` must
verify against ``answer`` itself through math-verify (no string fast path). A JSONL line
that is not a JSON object (invalid UTF-8 or JSON included) is dropped too, with reason
``not a JSON object`` and what is wrong in ``detail``. Every dropped row goes to
``OUT.dropped.jsonl`` with its reason and file:line (or Parquet row), and the summary
counts each reason and shows examples (a bad line's example is its file:line): nothing
disappears silently.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from nemo_guide.data.jsonl import BadLine, read_jsonl
from nemo_guide.data.records import DataError, Record, write_records
from nemo_guide.rewards.math import VerifierPool

EXAMPLES = 5


def _rows(path: Path) -> Iterable[tuple[str, dict[str, Any] | BadLine]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        # Bad lines are dropped like any unusable row (module docstring), not raised.
        for lineno, entry in read_jsonl(path, on_bad="skip").in_order():
            yield f"{path}:{lineno}", entry
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's errors for a file that is not Parquet, or is damaged
            raise DataError(f"{path}: cannot be read as Parquet ({exc})") from exc
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}: row {i}", row
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl or .parquet")


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def prepare(input_path: Path, output: Path, *, id_field: str = "uuid", workers: int = 2, timeout_s: float = 3.0) -> dict[str, Any]:
    """Convert ``input_path`` into records at ``output``; returns the summary."""
    input_path, output = Path(input_path), Path(output)
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path} does not exist")
    kept: list[Record] = []
    dropped: list[dict[str, Any]] = []
    seen: set[str] = set()
    candidates: list[tuple[str, Record]] = []
    for n, (where, row) in enumerate(_rows(input_path)):
        if isinstance(row, BadLine):
            dropped.append({"where": where, "reason": "not a JSON object", "detail": row.problem})
            continue
        problem, answer = _text(row.get("problem")), _text(row.get("answer"))
        rid = _text(row.get(id_field)) or _text(row.get("id")) or f"{input_path.stem}-{n}"
        if problem is None or answer is None:
            dropped.append({"where": where, "id": rid, "reason": "missing problem" if problem is None else "missing answer", "row": row})
            continue
        if rid in seen:
            dropped.append({"where": where, "id": rid, "reason": "duplicate id", "row": row})
            continue
        seen.add(rid)
        extra = {k: v for k, v in row.items() if k not in ("problem", "answer", "solution", "hint", "id")}
        candidates.append((where, Record(rid, problem, answer, hint=_text(row.get("hint")), solution=_text(row.get("solution")), extra=extra)))
    pool = VerifierPool(num_workers=workers, timeout_s=timeout_s, fast_path=False)
    try:
        scores = pool.score(["\\boxed{" + r.answer + "}" for _, r in candidates], [r.answer for _, r in candidates])
    finally:
        pool.close()
    for (where, record), score in zip(candidates, scores, strict=True):
        if score == 1.0:
            kept.append(record)
        else:
            dropped.append({"where": where, "id": record.id, "reason": "answer not usable by the verifier", "answer": record.answer})
    output.parent.mkdir(parents=True, exist_ok=True)
    write_records(output, kept)
    dropped_path = output.with_name(output.name + ".dropped.jsonl")
    with dropped_path.open("w", encoding="utf-8") as f:
        for d in dropped:
            f.write(json.dumps(d, ensure_ascii=False, default=str) + "\n")
    reasons = Counter(d["reason"] for d in dropped)
    return {
        "input": str(input_path),
        "output": str(output),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": dict(reasons),
        "examples": {r: [d.get("answer", d.get("id", d["where"])) for d in dropped if d["reason"] == r][:EXAMPLES] for r in reasons},
        "dropped_file": str(dropped_path),
    }
