"""Evaluation: held-out pass@1 during training, and benchmark pass@1 / pass@k with confidence intervals.

One path: :func:`answer_batch` answers and verifies a batch of prepared prompts
(:mod:`nemo_guide.prompts`: one templating, one overflow rule) for both callers,
:func:`heldout_pass1` (the training loop's evaluation) and :func:`evaluate_benchmarks`
(``nemo-guide eval``).

:func:`evaluate_benchmarks` generates, for every problem of every benchmark, one greedy
answer and ``n`` samples at a temperature (and the same with the hint when
``with_hints``), scores them with the verifier and appends every sample to
``samples.jsonl`` (``benchmark``, ``id``, ``sample`` (-1 = greedy), ``guided``, ``text``,
``correct``). A rerun skips problems whose samples are all there, so a killed evaluation
resumes. :func:`summarize` turns the samples into per-benchmark pass@1 (greedy, and the
mean over samples) and unbiased pass@k, each with a 95% confidence interval over problems,
plus macro (mean of benchmarks) and micro (all problems pooled) averages;
:func:`markdown_table` lays them out like the paper's Table 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from nemo_guide.backends.base import Generator, PromptTokenizer
from nemo_guide.core.metrics import pass_at_k
from nemo_guide.data.jsonl import prepare_append
from nemo_guide.data.records import Record
from nemo_guide.prompts import Prompt, PromptSet, PromptSettings, encode_prompts
from nemo_guide.rewards import RewardFn, is_correct
from nemo_guide.samples import SAMPLES_FILE, read_samples

Z95 = 1.959964


@dataclass(frozen=True)
class Benchmark:
    name: str
    records: list[Record]


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 4
    """Samples per problem at ``temperature`` (0: greedy only)."""
    temperature: float = 0.6
    top_p: float = 1.0
    with_hints: bool = False
    """Also evaluate the hinted prompt of records that have a hint (Figure 2)."""
    seed: int = 0


def evaluate_benchmarks(
    generator: Generator,
    tokenizer: PromptTokenizer,
    benchmarks: Sequence[Benchmark],
    reward_fn: RewardFn,
    spec: SamplingSpec,
    settings: PromptSettings,
    out_dir: Path,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Generate and score every missing sample; returns the samples file.

    Prompts are prepared by :func:`nemo_guide.prompts.encode_prompts` with ``settings``
    (whose ``max_new_tokens`` is the answer budget); a prompt that cannot be run is
    written as an incorrect sample with its reason in ``error``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SAMPLES_FILE
    have: dict[tuple[str, str, bool], set[int]] = {}
    for row in read_samples(path):
        have.setdefault((row["benchmark"], row["id"], row["guided"]), set()).add(row["sample"])
    wanted = set(range(-1, spec.n))
    jobs: list[tuple[str, Record, bool, int, Prompt]] = []  # (benchmark, record, guided, sample, prompt)
    for bench in benchmarks:
        prompts = encode_prompts(bench.records, tokenizer, settings, hinted=spec.with_hints)
        for record, plain, hinted in zip(prompts.records, prompts.plain, prompts.hinted, strict=True):
            for guided, prompt in ((False, plain), (True, hinted)) if hinted is not None else ((False, plain),):
                done = have.get((bench.name, record.id, guided), set())
                jobs += [(bench.name, record, guided, s, prompt) for s in sorted(wanted - done)]
    bar = None
    if progress and jobs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="eval", unit="sample", dynamic_ncols=True)
    prepare_append(path)  # cut a torn final line (a kill mid-write), so appended rows start on a fresh line
    with path.open("a", encoding="utf-8") as f:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            texts, correct = answer_batch(
                generator, tokenizer, reward_fn, [job[4] for job in chunk], [job[1].answer for job in chunk],
                [0.0 if job[3] == -1 else spec.temperature for job in chunk],
                top_p=spec.top_p, max_new_tokens=settings.max_new_tokens, seed=spec.seed * 1_000_003 + start,
            )
            for (bench, record, guided, sample, prompt), text, ok in zip(chunk, texts, correct, strict=True):
                row = {"benchmark": bench, "id": record.id, "sample": sample, "guided": guided, "text": text, "correct": ok}
                if prompt.problem is not None:
                    row["error"] = f"the prompt {prompt.problem}"
                f.write(json.dumps(row) + "\n")
            f.flush()
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return path


def answer_batch(
    generator: Generator,
    tokenizer: PromptTokenizer,
    reward_fn: RewardFn,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    temperatures: Sequence[float],
    *,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> tuple[list[str], list[bool]]:
    """Answer and verify one batch of prepared prompts: the step every evaluation shares.

    Rows are generated one temperature at a time (ascending, so greedy rows first), each
    call seeded with ``seed``. A prompt that cannot be run (``Prompt.problem``, the one
    overflow rule of :mod:`nemo_guide.prompts`) gets no generation, an empty answer and
    ``False``: scored incorrect, never dropped. Correctness is
    :func:`nemo_guide.rewards.is_correct`, as in training.

    Returns:
        ``(answer texts, correct)``, one each per prompt.
    """
    texts = [""] * len(prompts)
    for temperature in sorted(set(temperatures)):
        rows = [i for i, (p, t) in enumerate(zip(prompts, temperatures, strict=True)) if t == temperature and p.problem is None]
        if not rows:
            continue
        responses, _ = generator.generate(
            [prompts[i].ids for i in rows], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        for i, response in zip(rows, responses, strict=True):
            texts[i] = tokenizer.decode(response)
    scores = reward_fn([p.text for p in prompts], texts, answers=list(answers))
    return texts, [is_correct(s) and p.problem is None for s, p in zip(scores, prompts, strict=True)]


def heldout_pass1(
    generator: Generator,
    tokenizer: PromptTokenizer,
    reward_fn: RewardFn,
    prompts: PromptSet,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Held-out pass@1 without hints during training (greedy when ``temperature == 0``),
    overall and per record ``kind`` (the built-in tasks' known / novel / unseen operators);
    ``eval/unscorable`` counts prompts the policy could not take (scored 0), when any."""
    correct: list[bool] = []
    for start in range(0, len(prompts.records), batch_size):
        chunk = slice(start, start + batch_size)
        records = prompts.records[chunk]
        _, ok = answer_batch(
            generator, tokenizer, reward_fn, prompts.plain[chunk], [r.answer for r in records], [temperature] * len(records),
            top_p=top_p, max_new_tokens=max_new_tokens, seed=seed + start,
        )
        correct += ok
    out = {"eval/pass1": sum(correct) / max(1, len(correct)), "eval/problems": float(len(correct))}
    unscorable = sum(p.problem is not None for p in prompts.plain)
    if unscorable:
        out["eval/unscorable"] = float(unscorable)
    kinds: dict[str, list[bool]] = {}
    for record, c in zip(prompts.records, correct, strict=True):
        if "kind" in record.extra:
            kinds.setdefault(str(record.extra["kind"]), []).append(c)
    for kind, values in sorted(kinds.items()):
        out[f"eval/pass1_{kind}"] = sum(values) / len(values)
    return out


# -- summaries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemStats:
    """One problem's samples: greedy correctness, ``n`` samples of which ``c`` correct."""

    benchmark: str
    id: str
    guided: bool
    greedy: bool | None
    n: int
    c: int
    first: tuple[bool, ...]
    """Sample correctness in sample order."""
    unscorable: bool = False
    """The policy could not take the prompt (see the samples' ``error``); scored incorrect."""


def problem_stats(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, bool], ProblemStats]:
    grouped: dict[tuple[str, str, bool], dict[int, bool]] = {}
    failed: set[tuple[str, str, bool]] = set()
    for row in rows:
        key = (row["benchmark"], str(row["id"]), bool(row["guided"]))
        grouped.setdefault(key, {})[int(row["sample"])] = bool(row["correct"])
        if row.get("error"):
            failed.add(key)
    out = {}
    for key, samples in grouped.items():
        ordered = tuple(samples[i] for i in sorted(s for s in samples if s >= 0))
        out[key] = ProblemStats(key[0], key[1], key[2], samples.get(-1), len(ordered), sum(ordered), ordered, key in failed)
    return out


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width of the normal 95% interval over the values)``; 0 width for one value."""
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, Z95 * math.sqrt(var / len(values))


def _metrics(problems: Sequence[ProblemStats], ks: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"problems": len(problems), "unscorable": sum(p.unscorable for p in problems)}
    greedy = [float(p.greedy) for p in problems if p.greedy is not None]
    if greedy:
        out["pass1_greedy"], out["pass1_greedy_ci95"] = mean_ci(greedy)
    sampled = [p for p in problems if p.n > 0]
    if sampled:
        out["pass1_mean"], out["pass1_mean_ci95"] = mean_ci([p.c / p.n for p in sampled])
        for k in ks:
            if k <= min(p.n for p in sampled):
                out[f"pass{k}"], out[f"pass{k}_ci95"] = mean_ci([pass_at_k(p.n, p.c, k) for p in sampled])
    return out


def summarize(rows: Iterable[dict[str, Any]], ks: Sequence[int] = (1,), *, guided: bool = False) -> dict[str, Any]:
    """Per-benchmark, macro and micro metrics of the unguided (or guided) samples."""
    stats = [p for p in problem_stats(rows).values() if p.guided == guided]
    names = sorted({p.benchmark for p in stats})
    per = {name: _metrics([p for p in stats if p.benchmark == name], ks) for name in names}
    macro: dict[str, Any] = {}
    for key in sorted({k for m in per.values() for k in m if not k.endswith("_ci95") and k not in ("problems", "unscorable")}):
        values = [m[key] for m in per.values() if key in m]
        if len(values) == len(per):
            macro[key] = sum(values) / len(values)
    return {"benchmarks": per, "macro": macro, "micro": _metrics(stats, ks), "guided": guided}


def markdown_table(summary: dict[str, Any], title: str = "model") -> str:
    """Rows: metrics; columns: benchmarks, macro and micro average (percent, +- 95% CI)."""
    per = summary["benchmarks"]
    names = list(per)
    metrics = [k for k in ("pass1_greedy", "pass1_mean") if any(k in m for m in per.values())]
    # pass@1 (unbiased) equals the mean over samples, which has its own row.
    metrics += sorted({k for m in per.values() for k in m if k.startswith("pass") and k[4:].isdigit() and k != "pass1"}, key=lambda k: int(k[4:]))
    label = {"pass1_greedy": "pass@1 (greedy)", "pass1_mean": "pass@1 (mean of samples)"}
    head = f"| {title} | " + " | ".join(names) + " | macro avg | micro avg |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for metric in metrics:
        cells = []
        for m in [per[n] for n in names] + [summary["micro"]]:
            cells.append(f"{100 * m[metric]:.1f} ± {100 * m[metric + '_ci95']:.1f}" if metric in m else "-")
        macro = summary["macro"].get(metric)
        cells.insert(len(names), f"{100 * macro:.1f}" if macro is not None else "-")
        lines.append(f"| {label.get(metric, 'pass@' + metric[4:])} | " + " | ".join(cells) + " |")
    lines.append("")
    counts = ", ".join(f"{n} {per[n]['problems']}" + (f" ({per[n]['unscorable']} the policy could not take, scored 0)" if per[n]["unscorable"] else "") for n in names)
    lines.append(f"Problems: {counts}. ± is the 95% interval over problems.")
    return "\n".join(lines) + "\n"
