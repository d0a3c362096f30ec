"""The verifier subprocess: math-verify equivalence checks, one pair at a time.

Runs in its own process so that the parent can kill it when a check overruns: the
signal-based timeouts of math-verify cannot interrupt a single C-level operation
(a huge integer power in sympy), a hard kill can.
"""

from __future__ import annotations

import os

# Soft limits inside the worker (math-verify's own signal.alarm timeouts, whole seconds).
PARSE_TIMEOUT_S = 1
VERIFY_TIMEOUT_S = 2


def verify_pair(gold: str, pred: str) -> bool:
    """Whether ``pred`` (the content of the model's final box) is equivalent to ``gold``."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    latex = [LatexExtractionConfig()]
    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=latex, parsing_timeout=PARSE_TIMEOUT_S)
    if not gold_parsed:
        gold_parsed = parse("$" + gold + "$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=PARSE_TIMEOUT_S)
    if not gold_parsed:
        return False
    pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=latex, parsing_timeout=PARSE_TIMEOUT_S)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=VERIFY_TIMEOUT_S))


def serve(conn) -> None:
    """Answer ``(gold, pred)`` requests on ``conn`` with ``(ok: bool, error: str | None)``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (import once, before the first request)

    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        gold, pred = request
        try:
            conn.send((verify_pair(gold, pred), None))
        except Exception as exc:  # a parser bug on odd input is a wrong answer, not a crash
            conn.send((False, f"{type(exc).__name__}: {exc}"[:200]))
