"""The one JSONL reader of the project, its policy for a bad line, and the append guard.

A JSONL file holds one JSON object per line. Lines end with ``\\n`` (a ``\\r`` before it
is whitespace); a UTF-8 byte-order mark before line 1 is ignored; blank lines are
skipped. Line numbers count every line, blank ones included, from 1, as an editor does.

**A bad line** is one that is not valid UTF-8, not valid JSON, or valid JSON but not an
object. :func:`read_jsonl` handles bad lines one way, chosen by the caller:

- ``on_bad="raise"`` (the default): one :class:`JsonlError` (a
  :class:`~nemo_guide.data.errors.DataError`) after the whole file is read, listing every
  bad line as ``file:line: what is wrong; the fix``;
- ``on_bad="skip"``, only where a command documents that it drops bad rows (``nemo-guide
  data prepare``), or where the caller raises them itself within a larger error (the
  records loader lists them with its field problems): the bad lines are returned in
  :attr:`JsonlRead.skipped`, so the caller counts and reports them
  (:meth:`JsonlRead.skipped_summary`: ``2 bad line(s) skipped: f.jsonl:3, f.jsonl:9``).

**A torn line.** The project appends to some files as it goes (``metrics.jsonl``, the
evaluation's ``samples.jsonl``, the hint generator's output); a kill mid-write leaves a
final line cut short. A torn line is a final line without its ``\\n`` that does not parse
(as UTF-8 and JSON): a cut JSON object never parses, since an object ends with its last
byte. Readers of such files pass ``append_only=True``: a torn line is then reported in
:attr:`JsonlRead.torn`, never as an error, and its row is treated as never written. A bad
line anywhere else in such a file is still a bad line. Before appending, a writer calls
:func:`prepare_append`, which cuts the torn line off (and gives a complete final line
its missing ``\\n``), so the file stays valid JSONL.

Standard library only: ``nemo_guide.data`` imports without torch.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

from nemo_guide.data.errors import DataError, problem_listing

BOM = b"\xef\xbb\xbf"
JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}


@dataclass(frozen=True)
class BadLine:
    """A line that is not one JSON object."""

    path: Path
    line: int
    """1-based, blank lines counted."""
    problem: str
    """What is wrong and the fix, e.g. ``not valid JSON (Expecting value at column 1); ...``."""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass(frozen=True)
class TornTail:
    """The final line of an appended-to file, cut short by an interrupted write."""

    path: Path
    line: int
    """1-based line number of the cut line."""
    offset: int
    """Byte offset where the cut line starts: the file's length once it is cut off."""
    size: int
    """Bytes in the cut line."""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: final line cut short ({self.size} bytes, no newline) by an interrupted write; its row counts as not written"


@dataclass(frozen=True)
class JsonlRead:
    """What :func:`read_jsonl` found in one file."""

    path: Path
    rows: list[tuple[int, dict[str, Any]]]
    """``(line number, object)`` per good line, in file order."""
    skipped: list[BadLine]
    """Bad lines (``on_bad="skip"`` only; with ``"raise"`` they raise instead)."""
    torn: TornTail | None
    """The torn final line (``append_only=True`` only; otherwise it is a bad line)."""

    def objects(self) -> list[dict[str, Any]]:
        return [row for _, row in self.rows]

    def in_order(self) -> list[tuple[int, dict[str, Any] | BadLine]]:
        """Good rows and skipped bad lines together, by line number."""
        return sorted([*self.rows, *((bad.line, bad) for bad in self.skipped)], key=lambda entry: entry[0])

    def skipped_summary(self) -> str:
        """``"2 bad line(s) skipped: f.jsonl:3, f.jsonl:9"``, or ``""`` when none were."""
        if not self.skipped:
            return ""
        return f"{len(self.skipped)} bad line(s) skipped: " + ", ".join(bad.where for bad in self.skipped)


class JsonlError(DataError):
    """Bad lines in a JSONL file; the message lists every one with its file:line."""

    def __init__(self, path: Path, bad: list[BadLine], *, append_only: bool = False) -> None:
        self.path = path
        self.bad = bad
        header = f"{path}: {len(bad)} bad line(s); repair or delete them"
        if append_only:
            header += " (only a final line cut short by an interrupted write is expected in this file; these lines are not that)"
        super().__init__(problem_listing(header, [str(b) for b in bad]))


def _lines(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, raw bytes with their newline)`` per line, blank ones too."""
    offset = 0
    for number, raw in enumerate(f, start=1):
        yield number, offset, raw
        offset += len(raw)


def _decode(raw: bytes, number: int) -> tuple[Any, str | None]:
    """The line's JSON value, or why it has none (invalid UTF-8 or JSON)."""
    if number == 1 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    # Without its line ending, so that an error's column is a column of this line.
    raw = raw.removesuffix(b"\n").removesuffix(b"\r")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); save the file as UTF-8"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"


def _type_name(value: Any) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def read_jsonl(
    path: str | Path,
    *,
    on_bad: Literal["raise", "skip"] = "raise",
    append_only: bool = False,
    what: str = "a JSON object",
) -> JsonlRead:
    """Read every non-blank line of ``path`` as a JSON object (policy: module docstring).

    Args:
        on_bad: ``"raise"``: every bad line in one :class:`JsonlError`; ``"skip"``: bad lines
            go to :attr:`JsonlRead.skipped` for the caller to report.
        append_only: the project appends to this file, so a torn final line is expected and
            reported in :attr:`JsonlRead.torn` rather than as a bad line.
        what: what a line must be, for the message on a non-object line
            (``expected a JSON object with fields id, problem, answer, got an array``).

    Raises:
        JsonlError: ``on_bad="raise"`` and at least one bad line.
        FileNotFoundError: ``path`` does not exist.
    """
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad = {on_bad!r}: choose 'raise' or 'skip'")
    path = Path(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    bad: list[BadLine] = []
    torn = None
    with path.open("rb") as f:
        for number, offset, raw in _lines(f):
            if not raw.strip():
                continue
            value, problem = _decode(raw, number)
            if problem is not None and append_only and not raw.endswith(b"\n"):
                torn = TornTail(path, number, offset, len(raw))
            elif problem is not None:
                bad.append(BadLine(path, number, problem))
            elif not isinstance(value, dict):
                bad.append(BadLine(path, number, f"expected {what}, got {_type_name(value)}"))
            else:
                rows.append((number, value))
    if bad and on_bad == "raise":
        raise JsonlError(path, bad, append_only=append_only)
    return JsonlRead(path, rows, bad, torn)


def prepare_append(path: str | Path) -> TornTail | None:
    """Make ``path`` end at a line boundary, so that JSON lines can be appended to it.

    A torn final line is cut off and returned. A complete final line without its newline
    gets one (else the next row would be glued to it); a final line of blanks is cut. A
    missing or empty file, or one ending in a newline, is left as it is.
    """
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("r+b") as f:
        tail = deque(_lines(f), maxlen=1)  # the final line only
        last = tail[0] if tail else None
        if last is None or last[2].endswith(b"\n"):
            return None
        number, offset, raw = last
        if not raw.strip():
            f.truncate(offset)
            return None
        _, problem = _decode(raw, number)
        if problem is None:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            return None
        f.truncate(offset)
        return TornTail(path, number, offset, len(raw))
