"""Verifiable math reward: final-answer extraction plus math-verify equivalence.

``math_reward(completion, answer)`` is 1.0 when the completion's final answer (the last
complete ``\\boxed{...}``, else the last ``<answer>...</answer>``) is equivalent to the
gold answer, else 0.0. Model text is never evaluated as code: it is parsed by
math-verify's LaTeX grammar into sympy and compared there. Every check runs in a
worker process with a hard deadline, so one adversarial completion cannot stall a
training step; overruns score 0.0 and are counted in :attr:`VerifierPool.stats`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import wait
from pathlib import Path
from typing import Sequence

# An extracted answer longer than this scores 0.0 without parsing (no benchmark gold
# answer is longer than 200 characters; this is 5x the slack of a verbose model).
MAX_ANSWER_CHARS = 1000
# Hard deadline for one equivalence check, from dispatch to the worker. Together with a
# worker start (~1.5 s, once) it keeps a call under the 5 s contract.
HARD_TIMEOUT_S = 3.0

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def matching_braces(text: str) -> dict[int, int]:
    """Index of each ``{`` that is closed -> index of its ``}``; one linear pass."""
    match: dict[int, int] = {}
    stack: list[int] = []
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
    return match


def extract_answer(completion: str) -> str | None:
    """The final answer in ``completion``, or None.

    The last complete ``\\boxed{...}`` (or ``\\fbox{...}``) wins, nested braces
    included (``\\{`` and ``\\}`` are literal braces); a truncated last box falls back
    to the previous complete one. Without any box, the content of the last
    ``<answer>...</answer>``. Linear time in the length of ``completion``.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    boxes = list(_BOX_RE.finditer(completion))
    if boxes:
        match = matching_braces(completion)
        for box in reversed(boxes):
            open_at = box.end() - 1
            if open_at in match:
                return completion[open_at + 1 : match[open_at]].strip()
    answers = _ANSWER_RE.findall(completion)
    if answers:
        return answers[-1].strip()
    return None


_TRIVIAL = re.compile(r"\s+|\\left|\\right|\\!|\\,|\\;|\$")


def _normalise(text: str) -> str:
    return _TRIVIAL.sub("", text).rstrip(".")


class VerifierPool:
    """Worker processes that run math-verify checks under a hard deadline.

    Args:
        num_workers: processes to run checks on (each holds ~100 MB once math-verify
            and sympy are imported).
        timeout_s: hard deadline of one check; an overrun kills and restarts its worker
            and scores 0.0.
        fast_path: score 1.0 without a worker when the answer equals the gold string
            after trivial normalisation (whitespace, ``\\left``/``\\right``, ``$``).

    ``stats`` counts outcomes: ``checked``, ``fast_path`` (string-equal after trivial
    normalisation), ``no_answer``, ``too_long``, ``timeout``, ``error``.
    """

    def __init__(self, num_workers: int = 1, timeout_s: float = HARD_TIMEOUT_S, *, fast_path: bool = True) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.fast_path = fast_path
        self.stats: Counter[str] = Counter()
        self._workers: list[subprocess.Popen | None] = [None] * num_workers
        self._lock = threading.Lock()
        atexit.register(self.close)

    # -- worker management -------------------------------------------------------------
    def _start(self, slot: int) -> None:
        # A plain subprocess, not multiprocessing: spawn/forkserver re-import the
        # caller's __main__, which breaks scripts without an `if __name__` guard.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "nemo_guide.rewards._worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        if not wait([proc.stdout], timeout=120):
            proc.kill()
            raise RuntimeError("the math-verify worker did not start within 120 s")
        line = proc.stdout.readline()
        if not line.startswith('["ready"'):
            proc.kill()
            raise RuntimeError(
                "the math-verify worker failed to start; is math-verify installed? "
                "(pip install 'math-verify[antlr4_9_3]'); it said: " + (line.strip() or "nothing")
            )
        self._workers[slot] = proc

    def _send(self, slot: int, gold: str, pred: str) -> None:
        proc = self._workers[slot]
        proc.stdin.write(json.dumps([gold, pred]) + "\n")
        proc.stdin.flush()

    def _kill(self, slot: int) -> None:
        proc = self._workers[slot]
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):  # the pipe of a killed worker may already be broken
                    stream.close()
            self._workers[slot] = None

    def close(self) -> None:
        for slot in range(self.num_workers):
            self._kill(slot)

    # -- scoring -------------------------------------------------------------------------
    def _prepare(self, completion: str, answer: str) -> tuple[float | None, str | None]:
        """Score without a worker where possible: ``(score, None)`` or ``(None, pred)``."""
        pred = extract_answer(completion)
        if pred is None or pred == "":
            self.stats["no_answer"] += 1
            return 0.0, None
        if len(pred) > MAX_ANSWER_CHARS:
            self.stats["too_long"] += 1
            return 0.0, None
        if self.fast_path and _normalise(pred) == _normalise(answer):
            self.stats["fast_path"] += 1
            return 1.0, None
        return None, pred

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        """1.0 / 0.0 per completion; checks run in parallel over the workers."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        scores: list[float] = [0.0] * len(completions)
        todo: list[tuple[int, str, str]] = []
        for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
            if not isinstance(answer, str):
                raise TypeError(f"answer {i} must be a str, got {type(answer).__name__}")
            score, pred = self._prepare(completion, answer)
            if pred is None:
                scores[i] = score
            else:
                todo.append((i, answer, pred))
        if todo:
            with self._lock:
                self._run(todo, scores)
        return scores

    def _run(self, todo: list[tuple[int, str, str]], scores: list[float]) -> None:
        queue = list(reversed(todo))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (item index, deadline)
        while queue or busy:
            for slot in range(self.num_workers):
                if queue and slot not in busy:
                    if self._workers[slot] is None:
                        self._start(slot)
                    i, gold, pred = queue.pop()
                    self._send(slot, gold, pred)
                    busy[slot] = (i, time.monotonic() + self.timeout_s)
            now = time.monotonic()
            next_deadline = min(d for _, d in busy.values())
            streams = {self._workers[s].stdout: s for s in busy}
            for stream in wait(list(streams), timeout=max(0.0, next_deadline - now)):
                slot = streams[stream]
                i, _ = busy.pop(slot)
                line = stream.readline()  # one small line per reply: written atomically
                if line:
                    ok, error = json.loads(line)
                else:  # the worker died (e.g. out of memory)
                    ok, error = False, "worker died"
                    self._kill(slot)
                self.stats["checked"] += 1
                if error:
                    self.stats["error"] += 1
                scores[i] = 1.0 if ok else 0.0
            now = time.monotonic()
            for slot, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(slot)
                    self._kill(slot)
                    self.stats["timeout"] += 1
                    scores[i] = 0.0


_default_pool: VerifierPool | None = None


def default_pool() -> VerifierPool:
    """The process-wide pool used by :func:`math_reward` (one worker, started lazily)."""
    global _default_pool
    if _default_pool is None:
        _default_pool = VerifierPool(num_workers=1)
    return _default_pool


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer is equivalent to ``answer``, else 0.0.

    Never evaluates model text as code; returns within 5 seconds on any input.
    """
    return default_pool().score([completion], [answer])[0]


class MathReward:
    """Reward function over strings: ``reward(prompts, completions, answers=...) -> list[float]``.

    Args:
        num_workers: verifier processes (checks of one batch run in parallel).
    """

    def __init__(self, num_workers: int = 1, timeout_s: float = HARD_TIMEOUT_S, *, fast_path: bool = True) -> None:
        self.pool = VerifierPool(num_workers=num_workers, timeout_s=timeout_s, fast_path=fast_path)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], *, answers: Sequence[str], **meta) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.pool.score(completions, answers)

    def close(self) -> None:
        self.pool.close()


_FORMAT_RE = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 if the completion is exactly ``<think>...</think> <answer>...</answer>`` (Appendix H).

    One think block, then one answer block, only whitespace around them.
    """
    return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0
