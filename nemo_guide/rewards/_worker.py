"""The verifier subprocess: math-verify equivalence checks, one pair at a time.

Runs in its own process so that the parent can kill it when a check overruns: the
signal-based timeouts of math-verify cannot interrupt a single C-level operation
(a huge integer power in sympy), a hard kill can.
"""

from __future__ import annotations

import os
import re

# Soft limits inside the worker (math-verify's own signal.alarm timeouts, whole seconds).
PARSE_TIMEOUT_S = 1
VERIFY_TIMEOUT_S = 2


_DOLLAR = re.compile(r"(?<!\\)\$")
_SPACE = re.compile(r"\s+")
# A trailing percent sign, as LaTeX, plain text or a word, with the spacing before it.
_PERCENT = re.compile(r"(?:\s|~|\\[,;:! ])*(?:\\?%|\\(?:text|mathrm)\s*\{\s*(?:\\?%|percent)\s*\}|percent)\s*$")


def strip_percent(answer: str) -> str:
    """``answer`` without a trailing percent sign: ``20\\%``, ``20%``, ``20 \\%``,
    ``20\\text{ percent}`` and ``20 percent`` all become ``20``. (The percent policy of
    :func:`verify_pair`; the sign is a unit, as math-verify reads ``9\\%`` = ``9``.)"""
    return _PERCENT.sub("", answer, count=1).strip()


def _whole(parsed: list, text: str) -> bool:
    """Whether math-verify read all of ``text``, not a number found inside it (its plain-
    expression reading of ``$-1./3$`` is ``-1``, of a physics formula a lone ``2``)."""
    return bool(parsed) and isinstance(parsed[-1], str) and _SPACE.sub("", parsed[-1]) == _SPACE.sub("", text)


def verify_pair(gold: str, pred: str) -> bool:
    """Whether ``pred`` (the content of the model's final box) is equivalent to ``gold``.

    Unescaped ``$`` are dropped from both first: inside a final answer they are only
    formatting, and math-verify would otherwise read just the first ``$...$`` span
    (so ``$(3,2)$+1`` would match ``(3,2)``).

    Percent policy: a trailing percent sign on either side is a unit and is dropped
    (:func:`strip_percent`), so ``20``, ``20\\%`` and ``20%`` all match the gold ``20\\%``,
    and ``20\\%`` matches the gold ``20``. A number is read in the unit the answer is
    given in: ``0.2`` does not match ``20\\%`` (math-verify does the same: ``$20\\%$``
    verifies against ``\\boxed{20}``, not against ``\\boxed{0.2}``).

    The gold answer has up to three readings, tried in turn until one verifies (a reading
    that fails to parse, or equals an earlier one, is skipped): LaTeX inside ``\\boxed{}``;
    LaTeX inside ``$...$``; a plain expression (``-1./3``), counted only when it reads the
    whole answer (:func:`_whole`). A gold answer is trusted data; the model's answer is
    only ever read as LaTeX, never as a Python expression.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold, pred = (strip_percent(_DOLLAR.sub(" ", text)) for text in (gold, pred))
    if not gold or not pred:
        return False

    latex = [LatexExtractionConfig()]
    pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=latex, parsing_timeout=PARSE_TIMEOUT_S)
    if not pred_parsed:
        return False

    def as_expression() -> list:
        parsed = parse(gold, extraction_config=[ExprExtractionConfig()], parsing_timeout=PARSE_TIMEOUT_S)
        return parsed if _whole(parsed, gold) else []

    readings = (
        lambda: parse("\\boxed{" + gold + "}", extraction_config=latex, parsing_timeout=PARSE_TIMEOUT_S),
        lambda: parse("$" + gold + "$", extraction_config=latex, parsing_timeout=PARSE_TIMEOUT_S),
        as_expression,
    )
    tried: list[list] = []
    for read in readings:
        gold_parsed = read()
        if not gold_parsed or gold_parsed in tried:
            continue
        if verify(gold_parsed, pred_parsed, timeout_seconds=VERIFY_TIMEOUT_S):
            return True
        tried.append(gold_parsed)
    return False


def serve() -> None:
    """Answer JSON lines ``[gold, pred]`` on stdin with ``[ok, error]`` lines on stdout.

    Run as ``python -m nemo_guide.rewards._worker``. Anything else that prints (library
    warnings) goes to stderr, so stdout carries only the protocol.
    """
    import json
    import logging
    import sys

    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (import once, before the first request)

    protocol.write(json.dumps(["ready", None]) + "\n")
    for line in sys.stdin:
        gold, pred = json.loads(line)
        try:
            reply = [verify_pair(gold, pred), None]
        except Exception as exc:  # a parser bug on odd input is a wrong answer, not a crash
            reply = [False, f"{type(exc).__name__}: {exc}"[:200]]
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    serve()
