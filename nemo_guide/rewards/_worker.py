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


def verify_pair(gold: str, pred: str) -> bool:
    """Whether ``pred`` (the content of the model's final box) is equivalent to ``gold``.

    Unescaped ``$`` are dropped from both first: inside a final answer they are only
    formatting, and math-verify would otherwise read just the first ``$...$`` span
    (so ``$(3,2)$+1`` would match ``(3,2)``).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold, pred = _DOLLAR.sub(" ", gold).strip(), _DOLLAR.sub(" ", pred).strip()
    if not gold or not pred:
        return False

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
