"""Errors a user can cause at run time (besides ``ConfigError`` and ``DataError``).

The CLI prints these in one line with exit code 2; anything else is a bug and keeps its
traceback (STYLE point 21).
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""
