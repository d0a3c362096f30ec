"""Benchmark evaluation: greedy and sampled answers, pass@1 / pass@k with confidence intervals.

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
from typing import Any, Callable, Iterable, Sequence

from nemo_guide.backends.base import PolicyBackend
from nemo_guide.core.metrics import pass_at_k
from nemo_guide.data.records import Record
from nemo_guide.data.templates import PromptStyle, build_prompt

SAMPLES_FILE = "samples.jsonl"
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
    max_new_tokens: int = 256
    with_hints: bool = False
    """Also evaluate the hinted prompt of records that have a hint (Figure 2)."""
    seed: int = 0


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The rows of a samples file (none if it does not exist).

    A torn final line (an evaluation killed mid-write) is left out: that sample counts as
    not generated, and the next ``evaluate_benchmarks`` cuts it off and generates it again.

    Raises:
        JsonlError: a bad line before the last one, named by file:line.
    """
    from nemo_guide.data.jsonl import read_jsonl

    path = Path(path)
    if not path.is_file():
        return []
    return read_jsonl(path, append_only=True).objects()


def _prompt_text(record: Record, guided: bool, style: str, hint_template: str | None, tokenizer: Any, system_prompt: str | None) -> str:
    return build_prompt(record.problem, style, hint=record.hint if guided else None, hint_template=hint_template, tokenizer=tokenizer, system_prompt=system_prompt)


def evaluate_benchmarks(
    backend: PolicyBackend,
    benchmarks: Sequence[Benchmark],
    reward_fn: Callable,
    spec: SamplingSpec,
    out_dir: Path,
    *,
    prompt_style: str = "plain",
    hint_template: str | None = None,
    system_prompt: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Generate and score every missing sample; returns the samples file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SAMPLES_FILE
    have: dict[tuple[str, str, bool], set[int]] = {}
    for row in read_samples(path):
        have.setdefault((row["benchmark"], row["id"], row["guided"]), set()).add(row["sample"])
    wanted = set(range(-1, spec.n))
    tokenizer = getattr(getattr(backend, "adapter", None), "tokenizer", None)
    add_special = prompt_style != PromptStyle.CHAT.value
    jobs: list[tuple[str, Record, bool, int]] = []  # (benchmark, record, guided, sample)
    for bench in benchmarks:
        for record in bench.records:
            for guided in (False, True) if spec.with_hints and record.hint else (False,):
                done = have.get((bench.name, record.id, guided), set())
                jobs += [(bench.name, record, guided, s) for s in sorted(wanted - done)]
    bar = None
    if progress and jobs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="eval", unit="sample", dynamic_ncols=True)
    from nemo_guide.data.jsonl import prepare_append

    prepare_append(path)  # cut a torn final line (a kill mid-write), so appended rows start on a fresh line
    with path.open("a", encoding="utf-8") as f:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            texts = [_prompt_text(r, g, prompt_style, hint_template, tokenizer, system_prompt) for _, r, g, _ in chunk]
            ids, errors = _encode_all(backend, texts, add_special, spec.max_new_tokens)
            outputs: list[str] = [""] * len(chunk)
            for greedy in (True, False):
                rows = [i for i, job in enumerate(chunk) if (job[3] == -1) == greedy and errors[i] is None]
                if not rows:
                    continue
                responses, _ = backend.generate(
                    [ids[i] for i in rows],
                    max_new_tokens=spec.max_new_tokens,
                    temperature=0.0 if greedy else spec.temperature,
                    top_p=spec.top_p,
                    seed=spec.seed * 1_000_003 + start,
                )
                for i, resp in zip(rows, responses):
                    outputs[i] = backend.decode(resp)
            scores = reward_fn(texts, outputs, answers=[r.answer for _, r, _, _ in chunk])
            for (bench, record, guided, sample), text, score, error in zip(chunk, outputs, scores, errors):
                row = {"benchmark": bench, "id": record.id, "sample": sample, "guided": guided, "text": text, "correct": bool(score > 0.5) and error is None}
                if error is not None:
                    row["error"] = error
                f.write(json.dumps(row) + "\n")
            f.flush()
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return path


def _encode_all(backend: PolicyBackend, texts: list[str], add_special: bool, max_new_tokens: int) -> tuple[list[list[int]], list[str | None]]:
    """Token ids per prompt, and why a prompt cannot be run (None if it can).

    A prompt the policy cannot take (characters its tokenizer lacks, or longer than its
    context minus ``max_new_tokens``) is scored incorrect with the reason in the sample's
    ``error`` field and counted as ``unscorable`` in the summary: never dropped silently.
    """
    limit = getattr(backend, "max_length", None)
    ids: list[list[int]] = []
    errors: list[str | None] = []
    for text in texts:
        try:
            seq = backend.encode(text, add_special_tokens=add_special)
        except ValueError as exc:
            ids.append([])
            errors.append(f"cannot encode the prompt: {exc}")
            continue
        ids.append(seq)
        if limit is not None and len(seq) + max_new_tokens > limit:
            errors.append(f"prompt of {len(seq)} tokens + max_new_tokens {max_new_tokens} exceeds the model's context {limit}")
        elif not seq:
            errors.append("empty prompt")
        else:
            errors.append(None)
    return ids, errors


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
