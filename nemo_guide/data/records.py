"""The record schema and its loaders (JSONL, Parquet).

A record is one problem: ``id``, ``problem``, ``answer`` (the gold final answer, LaTeX),
optional ``hint`` (Appendix G) and ``solution`` (a reference solution, for SFT and hint
generation). Fields beyond these are kept in ``extra``: nothing a user wrote is dropped.
Every problem in a file is reported at once, each with its file, line and field; in a
JSONL file that includes its bad lines (:mod:`nemo_guide.data.jsonl`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nemo_guide.data.errors import DataError, file_problems
from nemo_guide.data.jsonl import BadLine, read_jsonl

REQUIRED = ("id", "problem", "answer")
OPTIONAL = ("hint", "solution")


@dataclass(frozen=True)
class Record:
    id: str
    """Unique within a dataset; ints in the file are read as their decimal string."""
    problem: str
    """The question as shown to the model (before any prompt template)."""
    answer: str
    """The gold final answer, compared with math-verify."""
    hint: str | None = None
    """Natural-language guidance for guided rollouts (paper Appendix G)."""
    solution: str | None = None
    """A reference solution (SFT baseline, hint generation)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other field of the row, as read."""

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "problem": self.problem, "answer": self.answer}
        if self.hint is not None:
            row["hint"] = self.hint
        if self.solution is not None:
            row["solution"] = self.solution
        row.update(self.extra)
        return row


def _check_row(row: Any, where: str, problems: list[str]) -> Record | None:
    if not isinstance(row, dict):
        problems.append(f"{where}: expected a JSON object with fields {', '.join(REQUIRED)}, got {type(row).__name__}")
        return None
    values: dict[str, Any] = {}
    ok = True
    for name in REQUIRED:
        value = row.get(name)
        if value is None:
            problems.append(f"{where}: field '{name}' is missing; every record needs {', '.join(REQUIRED)}")
            ok = False
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            problems.append(f"{where}: field '{name}' must be a string, got {type(value).__name__} {str(value)[:60]!r}")
            ok = False
            continue
        if name == "id" and isinstance(value, float):
            problems.append(f"{where}: field 'id' must be a string or an integer, got {value!r}")
            ok = False
            continue
        value = str(value)
        if name != "answer" and not value.strip():
            problems.append(f"{where}: field '{name}' is empty")
            ok = False
        if name == "answer" and not value.strip():
            problems.append(f"{where}: field 'answer' is empty; the verifier needs a gold answer")
            ok = False
        values[name] = value
    for name in OPTIONAL:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}: field '{name}' must be a string or null, got {type(value).__name__}")
            ok = False
        elif isinstance(value, str) and not value.strip():
            problems.append(f"{where}: field '{name}' is an empty string; use null (or leave it out) for 'no {name}'")
            ok = False
        else:
            values[name] = value
    if not ok:
        return None
    extra = {k: v for k, v in row.items() if k not in REQUIRED + OPTIONAL}
    return Record(extra=extra, **values)


def _rows_jsonl(path: Path, problems: list[str]) -> Iterable[tuple[str, Any]]:
    # Bad lines are skipped here and reported with the field problems, all in one error.
    read = read_jsonl(path, on_bad="skip", what=f"a JSON object with fields {', '.join(REQUIRED)}")
    for lineno, entry in read.in_order():
        if isinstance(entry, BadLine):
            problems.append(str(entry))
        else:
            yield f"{path}:{lineno}", entry


def _rows_parquet(path: Path, problems: list[str]) -> Iterable[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a core dependency
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as Parquet ({exc})") from exc
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def load_records(path: str | Path) -> list[Record]:
    """Read a dataset file (``.jsonl``/``.json``/``.parquet``) into records.

    Raises:
        DataError: listing every bad row (file, line or row, field, and the fix) and
            every duplicated id (with both locations).
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    problems: list[str] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _rows_jsonl(path, problems)
    elif suffix in (".parquet", ".pq"):
        rows = _rows_parquet(path, problems)
    else:
        raise DataError(f"{path}: unknown dataset format {suffix!r}; use .jsonl (one JSON object per line) or .parquet")
    records: list[Record] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        record = _check_row(row, where, problems)
        if record is None:
            continue
        if record.id in seen:
            problems.append(f"{where}: duplicate id {record.id!r} (first at {seen[record.id]}); ids must be unique")
            continue
        seen[record.id] = where
        records.append(record)
    if problems:
        raise file_problems(path, problems)
    if not records:
        raise DataError(f"{path}: no records; the file is empty")
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Write records as JSONL (the inverse of :func:`load_records` for ``.jsonl``)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
