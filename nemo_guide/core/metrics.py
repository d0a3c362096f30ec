"""Evaluation metrics: unbiased pass@k and the progress decomposition of paper Eq. 1-2.

Plain Python on purpose (exact integer arithmetic, no tensors needed): these run on
per-problem counts, not on the training graph.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021).

    Computed with exact integer arithmetic, so it is exact (up to the final rounding to
    float) for ``n`` in the thousands, where the float product form loses digits.

    Args:
        n: samples drawn for the problem (``n >= 1``).
        c: how many of them are correct (``0 <= c <= n``).
        k: the budget (``1 <= k <= n``).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pass_at_k expects integers, got {name}={v!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def _as_bools(name: str, values: Iterable) -> list[bool]:
    out = []
    for i, v in enumerate(values):
        v = v.item() if hasattr(v, "item") else v
        if v not in (0, 1, True, False):
            raise ValueError(f"{name}[{i}] = {v!r} is not a boolean")
        out.append(bool(v))
    return out


def decompose_progress(init_pass1: Sequence, init_passk: Sequence, final_pass1: Sequence) -> dict[str, int]:
    """Split pass@1 progress into self-distillation and capability gain (Eq. 1-2).

    Args:
        init_pass1: per problem, solved by the initial policy at pass@1.
        init_passk: per problem, solved by the initial policy within k samples.
        final_pass1: per problem, solved by the trained policy at pass@1.
            All three: Shape: ``[P]`` booleans (lists, numpy or torch).

    Returns:
        Integer counts: ``progress`` (unsolved at init, solved after), ``distillation``
        (progress with init pass@k), ``capability_gain`` (progress without),
        ``regression`` (solved at init, unsolved after), ``net`` (progress - regression),
        and ``problems``, ``unsolved_init``.
    """
    a = _as_bools("init_pass1", init_pass1)
    b = _as_bools("init_passk", init_passk)
    f = _as_bools("final_pass1", final_pass1)
    if not len(a) == len(b) == len(f):
        raise ValueError(f"init_pass1, init_passk and final_pass1 must have one entry per problem; got {len(a)}, {len(b)}, {len(f)}")
    progress = sum(1 for x, y in zip(a, f, strict=True) if not x and y)
    distillation = sum(1 for x, k, y in zip(a, b, f, strict=True) if not x and k and y)
    regression = sum(1 for x, y in zip(a, f, strict=True) if x and not y)
    return {
        "problems": len(a),
        "unsolved_init": sum(1 for x in a if not x),
        "progress": progress,
        "distillation": distillation,
        "capability_gain": progress - distillation,
        "regression": regression,
        "net": progress - regression,
    }


def decompose_progress_expected(
    init_pass1: Sequence, init_n: Sequence[int], init_c: Sequence[int], k: int, final_pass1: Sequence
) -> dict[str, float]:
    """Eq. 1-2 in expectation over which k of the initial policy's n samples are drawn.

    The paper draws k of 100 samples at random per trial and averages trials; this is
    the limit of that average: a problem in progress counts ``pass@k`` towards
    distillation and ``1 - pass@k`` towards capability gain, with the unbiased pass@k
    of its ``c`` correct out of ``n`` initial samples.

    Returns:
        Float counts with the keys of :func:`decompose_progress`.
    """
    a = _as_bools("init_pass1", init_pass1)
    f = _as_bools("final_pass1", final_pass1)
    if not len(a) == len(init_n) == len(init_c) == len(f):
        raise ValueError("init_pass1, init_n, init_c and final_pass1 must have one entry per problem")
    pk = [pass_at_k(int(n), int(c), min(k, int(n))) for n, c in zip(init_n, init_c, strict=True)]
    progress = [not x and y for x, y in zip(a, f, strict=True)]
    distillation = sum(p for p, on in zip(pk, progress, strict=True) if on)
    n_progress = sum(progress)
    regression = sum(1 for x, y in zip(a, f, strict=True) if x and not y)
    return {
        "problems": float(len(a)),
        "unsolved_init": float(sum(1 for x in a if not x)),
        "progress": float(n_progress),
        "distillation": float(distillation),
        "capability_gain": float(n_progress - distillation),
        "regression": float(regression),
        "net": float(n_progress - regression),
    }


def pass_at_k_curve(ns: Sequence[int], cs: Sequence[int], max_k: int | None = None) -> list[float]:
    """Mean unbiased pass@k over problems for ``k = 1..max_k`` (default: the smallest n)."""
    if not ns or len(ns) != len(cs):
        raise ValueError("ns and cs must be non-empty and of equal length")
    top = min(ns) if max_k is None else max_k
    if top > min(ns):
        raise ValueError(f"max_k={top} exceeds the smallest sample count n={min(ns)}")
    return [sum(pass_at_k(int(n), int(c), k) for n, c in zip(ns, cs, strict=True)) / len(ns) for k in range(1, top + 1)]


def absolute_k(curve: Sequence[float], epsilon: float = 0.01) -> tuple[int, bool]:
    """``k_abs`` of Appendix C: the smallest k whose relative pass@k gain is below epsilon.

    ``k_abs = min{k >= 2 : (pass@k - pass@(k-1)) / pass@(k-1) < epsilon}``. A step from
    0 to 0 counts as converged (no gain); from 0 to a positive value as an infinite gain.

    Args:
        curve: ``pass@1 .. pass@K``, e.g. from :func:`pass_at_k_curve`.
        epsilon: the relative-gain threshold (> 0).

    Returns:
        ``(k_abs, converged)``; when no k up to ``K`` qualifies, ``(K, False)``: more
        samples are needed to locate the plateau.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not curve:
        raise ValueError("curve is empty")
    for k in range(2, len(curve) + 1):
        prev, cur = curve[k - 2], curve[k - 1]
        gain = (cur - prev) / prev if prev > 0 else (0.0 if cur <= 0 else math.inf)
        if gain < epsilon:
            return k, True
    return len(curve), False
