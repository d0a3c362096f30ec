"""Errors a user can cause at run time (besides ``ConfigError`` and ``DataError``).

The CLI prints the project's own error types (``ConfigError``, ``DataError`` with its
``JsonlError``, ``RunError``) and file errors in one line with exit code 2
(:func:`nemo_guide.cli.user_errors`); anything else is a bug and keeps its traceback
(STYLE point 21). Raise one of these, not a bare ``ValueError``, for a mistake the user
must fix.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""
