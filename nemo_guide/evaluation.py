"""Evaluation: held-out pass@1 during training, and benchmark samples for ``nemo-guide eval``.

One path: :func:`answer_batch` answers and verifies a batch of prepared prompts
(:mod:`nemo_guide.prompts`: one templating, one overflow rule) for both callers,
:func:`heldout_pass1` (the training loop's evaluation) and :func:`evaluate_benchmarks`
(``nemo-guide eval``).

:func:`evaluate_benchmarks` generates, for every problem of every benchmark, one greedy
answer and ``n`` samples at a temperature (and the same with the hint when
``with_hints``), scores them with the verifier and appends every sample to
``samples.jsonl`` (:mod:`nemo_guide.samples`: the fields, and what produced each row) as
soon as its batch is scored. A rerun generates only the missing samples, so a killed
evaluation resumes, and reuses a sample only when the model, its weights, the prompt and
the generation settings are the same. :mod:`nemo_guide.eval_report` summarises the samples.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nemo_guide.backends.base import Generator, PromptTokenizer
from nemo_guide.data import digit_ops
from nemo_guide.data.jsonl import prepare_append
from nemo_guide.data.records import Record
from nemo_guide.data.sources import BUILTIN_PREFIX, default_reward, load_split, resolve_eval
from nemo_guide.errors import RunError
from nemo_guide.prompts import Prompt, PromptSet, PromptSettings, encode_prompts
from nemo_guide.rewards import RewardFn, is_correct
from nemo_guide.samples import PROMPT_FIELD, SAMPLES_FILE, SampleSource, check_reuse, move_aside, prompt_sha256, read_samples

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Benchmark:
    name: str
    records: list[Record]
    source: str = ""
    """Where the records come from: a file path, or ``builtin:<task>``."""


def load_benchmarks(specs: Sequence[str], train: str, eval_spec: str | None, limit: int | None) -> list[Benchmark]:
    """``--benchmark [NAME=]FILE`` items (a file or ``builtin:<task>``), or else the held-out
    set of the config (``data.eval``, or a built-in task's eval split); the first ``limit``
    problems of each."""
    out = []
    for item in specs:
        name, _, path = item.rpartition("=")
        if path.startswith(BUILTIN_PREFIX) and path[len(BUILTIN_PREFIX):] not in digit_ops.TASKS:
            raise RunError(f"--benchmark {item}: unknown built-in task; choose one of {', '.join(BUILTIN_PREFIX + t for t in digit_ops.TASKS)}")
        out.append(Benchmark(name or Path(path).stem, load_split(path, "eval"), path))
    if not out:
        source = resolve_eval(train, eval_spec)
        if source is None:
            raise RunError("nothing to evaluate: pass --benchmark NAME=FILE.jsonl, or set data.eval in the config")
        name = source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else Path(source).stem
        out.append(Benchmark(name, load_split(source, "eval"), source))
    return [Benchmark(b.name, b.records[:limit], b.source) for b in out]


def eval_reward(specs: Sequence[str], configured: str, train: str) -> str:
    """The verifier: ``data.reward`` unless ``auto``; then, with ``--benchmark`` items,
    ``exact`` when all are built-in tasks (answers after ``A:``) and ``math`` otherwise;
    without, the training data's default."""
    if configured != "auto":
        return configured
    if specs:
        return "exact" if all(item.rpartition("=")[2].startswith(BUILTIN_PREFIX) for item in specs) else "math"
    return default_reward(train)


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 4
    """Samples per problem at ``temperature`` (0: greedy only)."""
    temperature: float = 0.6
    top_p: float = 1.0
    with_hints: bool = False
    """Also evaluate the hinted prompt of records that have a hint (Figure 2)."""
    seed: int = 0


class Progress:
    """A tqdm bar (``bar=True``), or a log line every 10% of ``total`` or ``every_s`` seconds."""

    def __init__(self, total: int, *, bar: bool, log: Log = log_stderr, every_s: float = 30.0, unit: str = "samples") -> None:
        self.total, self.done, self.unit, self.log, self.every_s = total, 0, unit, log, every_s
        self.start = self.last = time.monotonic()
        self.next_percent = 10
        self.bar = None
        if bar and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="eval", unit=unit.rstrip("s"), dynamic_ncols=True)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        percent = 100 * self.done // max(1, self.total)
        if percent >= self.next_percent or now - self.last >= self.every_s:
            elapsed = now - self.start
            left = elapsed / max(1, self.done) * (self.total - self.done)
            self.log(f"eval: {self.done}/{self.total} {self.unit} ({percent}%), {elapsed:.0f} s, about {left:.0f} s left")
            self.last, self.next_percent = now, percent // 10 * 10 + 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


Job = tuple[Benchmark, Record, bool, int, Prompt, str]
"""``(benchmark, record, guided, sample, prompt, prompt_sha256)``; sample -1 is the greedy answer."""


def _jobs(benchmarks: Sequence[Benchmark], tokenizer: PromptTokenizer, settings: PromptSettings, spec: SamplingSpec) -> list[Job]:
    """Every sample of the evaluation, greedy answers first, then problem by problem."""
    greedy: list[Job] = []
    sampled: list[Job] = []
    for bench in benchmarks:
        prompts = encode_prompts(bench.records, tokenizer, settings, hinted=spec.with_hints, source=bench.source or bench.name)
        for record, plain, hinted in zip(prompts.records, prompts.plain, prompts.hinted, strict=True):
            for guided, prompt in ((False, plain), (True, hinted)) if hinted is not None else ((False, plain),):
                digest = prompt_sha256(prompt.text)
                greedy.append((bench, record, guided, -1, prompt, digest))
                sampled += [(bench, record, guided, s, prompt, digest) for s in range(spec.n)]
    return greedy + sampled


def evaluate_benchmarks(
    generator: Generator,
    tokenizer: PromptTokenizer,
    benchmarks: Sequence[Benchmark],
    reward_fn: RewardFn,
    spec: SamplingSpec,
    settings: PromptSettings,
    out_dir: Path,
    *,
    source: SampleSource,
    fresh: bool = False,
    batch_size: int = 64,
    progress: bool = True,
    log: Log = log_stderr,
) -> Path:
    """Generate and score every missing sample; returns the samples file.

    Prompts are prepared by :func:`nemo_guide.prompts.encode_prompts` with ``settings``
    (whose ``max_new_tokens`` is the answer budget); a prompt that cannot be run is
    written as an incorrect sample with its reason in ``error``. Samples go in batches of
    ``batch_size`` of one temperature (one ``generate`` call each, seeded by the run seed
    and the batch's place in the full list); each batch is scored, appended and flushed
    before the next starts, so a kill loses at most the batch in flight.

    Args:
        source: what produces the samples; every row records it, and rows already in the
            file are reused only when theirs is the same (:func:`nemo_guide.samples.check_reuse`).
        fresh: move an existing samples file aside (``samples.jsonl.old-<timestamp>``) first.
        progress: a progress bar; without it a log line every 10% or 30 s (``log``).

    Raises:
        RunError: the file holds samples of another model, prompt or setting.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SAMPLES_FILE
    if fresh and (old := move_aside(path)) is not None:
        log(f"eval: --fresh: the previous samples are kept as {old}")
    jobs = _jobs(benchmarks, tokenizer, settings, spec)
    rows = read_samples(path)
    check_reuse(path, rows, source, {(b.name, r.id, guided): digest for b, r, guided, _, _, digest in jobs})
    have = {(row["benchmark"], str(row["id"]), bool(row["guided"]), int(row["sample"])) for row in rows}
    batches = [(start, [j for j in jobs[start : start + batch_size] if (j[0].name, j[1].id, j[2], j[3]) not in have]) for start in range(0, len(jobs), batch_size)]
    todo = sum(len(batch) for _, batch in batches)
    if not progress:
        log(f"eval: {todo} of {len(jobs)} samples to generate into {path}" + (f" ({len(jobs) - todo} already there)" if todo < len(jobs) else ""))
    bar = Progress(todo, bar=progress, log=log)
    fields = source.fields()
    prepare_append(path)  # cut a torn final line (a kill mid-write), so appended rows start on a fresh line
    with path.open("a", encoding="utf-8") as f:
        for start, batch in batches:
            if not batch:
                continue
            texts, correct = answer_batch(
                generator, tokenizer, reward_fn, [job[4] for job in batch], [job[1].answer for job in batch],
                [0.0 if job[3] == -1 else spec.temperature for job in batch],
                top_p=spec.top_p, max_new_tokens=settings.max_new_tokens, seed=spec.seed * 1_000_003 + start,
            )
            for (bench, record, guided, sample, prompt, digest), text, ok in zip(batch, texts, correct, strict=True):
                row = {"benchmark": bench.name, "id": record.id, "sample": sample, "guided": guided, "text": text, "correct": ok}
                if prompt.problem is not None:
                    row["error"] = f"the prompt {prompt.problem}"
                f.write(json.dumps({**row, **fields, PROMPT_FIELD: digest}) + "\n")
            f.flush()
            bar.update(len(batch))
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
