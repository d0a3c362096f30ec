"""The error a conversion raises for input it cannot convert (a model config, a checkpoint)."""

from __future__ import annotations


class ConvertError(ValueError):
    """A checkpoint or model config that cannot be converted; the message names the file or field and the fix.

    The CLI prints it in one line (``nemo-guide convert``); it is a ``ValueError`` for callers
    that catch one."""
