"""The error type of dataset and run files, and the one way its message lists problems."""

from __future__ import annotations

from pathlib import Path

MAX_REPORTED = 20
"""At most this many problems are spelled out in one message; the rest are counted."""


class DataError(ValueError):
    """A dataset file that cannot be used as is; the message lists every problem found."""


def problem_listing(header: str, problems: list[str]) -> str:
    """``header`` then one indented problem per line (the first :data:`MAX_REPORTED`)."""
    shown = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return header + ":\n  " + "\n  ".join(shown) + more


def file_problems(path: Path, problems: list[str]) -> DataError:
    """The error for a file with ``problems`` (each already naming its file and line)."""
    return DataError(problem_listing(f"{path}: {len(problems)} problem(s)", problems))
