"""The samples file of ``nemo-guide eval``: its rows, what produced them, and when they may be reused.

``samples.jsonl`` holds one row per answer: ``benchmark``, ``id``, ``sample`` (-1 = greedy),
``guided``, ``text``, ``correct`` (and ``error`` for a prompt the policy could not take),
plus what produced it, :data:`SOURCE_FIELDS`: ``model`` (the checkpoint directory, or
``backend.model``), ``backend_model``, ``weights_sha256`` (of the weights file; of every
``*.safetensors`` file's name and hash for a directory of several), ``temperature``,
``top_p``, ``max_new_tokens``, ``seed``, and ``prompt_sha256`` (of the exact prompt text,
template and hint included).

A rerun into the same directory resumes: it reuses a row only when all of these match
(:func:`check_reuse`), so the results never mix two models, two prompts or two sampling
settings. Otherwise it refuses, listing every differing field; ``--fresh`` moves the old
file aside (:func:`move_aside`, nothing is deleted) and starts over.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from nemo_guide.data.errors import DataError, problem_listing
from nemo_guide.data.jsonl import read_jsonl
from nemo_guide.errors import RunError

SAMPLES_FILE = "samples.jsonl"
ROW_FIELDS = ("benchmark", "id", "sample", "guided", "correct")
"""Fields every row has (what :mod:`nemo_guide.analysis` reads)."""
PROMPT_FIELD = "prompt_sha256"


@dataclass(frozen=True)
class SampleSource:
    """What produced a row besides its prompt: the same for every row of one evaluation."""

    model: str
    """The checkpoint directory evaluated (absolute), or ``backend.model`` without one."""
    backend_model: str
    """``backend.model``: the architecture and tokenizer the weights were loaded into."""
    weights_sha256: str
    """SHA-256 of the weights (:func:`weights_sha256`)."""
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    def fields(self) -> dict[str, Any]:
        return asdict(self)


SOURCE_FIELDS = tuple(SampleSource.__dataclass_fields__)


def model_source(
    backend_model: str, checkpoint: str | None, builtin_file: Path | None, temperature: float, top_p: float, max_new_tokens: int, seed: int
) -> SampleSource:
    """The :class:`SampleSource` of an evaluation; hashes the weights (once per evaluation).

    Args:
        backend_model: ``backend.model``: ``builtin:<name>``, a ``.safetensors`` file of the
            tiny model, or a Hugging Face model directory (its ``*.safetensors``).
        checkpoint: a checkpoint directory whose ``model.safetensors`` is evaluated instead.
        builtin_file: the packaged weights file (or Hugging Face directory) of a ``builtin:`` model.

    Raises:
        RunError: no weights where ``backend.model`` or ``checkpoint`` points.
    """
    model = backend_model
    if builtin_file is not None:
        files = sorted(Path(builtin_file).glob("*.safetensors")) if Path(builtin_file).is_dir() else [builtin_file]
    else:
        model = str(Path(backend_model).resolve())
        files = [Path(model)] if Path(model).is_file() else sorted(Path(model).glob("*.safetensors"))
        if not files:
            raise RunError(
                f"backend.model = {backend_model!r}: no safetensors weights there; give a Hugging Face model directory "
                "with *.safetensors, a .safetensors file of the tiny model, or builtin:tiny"
            )
    evaluated = model
    if checkpoint is not None:
        evaluated = str(Path(checkpoint).resolve())
        files = [Path(evaluated) / "model.safetensors"]
        if not files[0].is_file():
            raise RunError(f"checkpoint={checkpoint}: no model.safetensors in it; give a checkpoint directory, e.g. runs/<name>/checkpoints/step_000120")
    return SampleSource(evaluated, model, weights_sha256(files), temperature, top_p, max_new_tokens, seed)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(files: Iterable[Path]) -> str:
    """SHA-256 of one weights file (what ``sha256sum`` prints), or, for several, of their
    ``name hash`` lines in name order. Reads every byte: call it once per evaluation."""
    files = sorted(Path(f) for f in files)
    if not files:
        raise ValueError("weights_sha256 needs at least one file")
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(f"{f.name} {file_sha256(f)}\n" for f in files).encode()).hexdigest()


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The rows of a samples file (none if it does not exist).

    A torn final line (an evaluation killed mid-write) is left out: that sample counts as
    not generated, and the next evaluation cuts it off and generates it again.

    Raises:
        JsonlError: a bad line before the last one, named by file:line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    return read_jsonl(path, append_only=True).objects()


def read_sample_file(path: Path) -> list[dict[str, Any]]:
    """The rows of a samples file that must exist and hold only sample rows (for ``analyze``).

    Raises:
        FileNotFoundError: no such file.
        DataError: rows without the fields of :data:`ROW_FIELDS`, each named by file:line
            (a records file, with ``problem`` and ``answer``, is named as one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist; write it with `nemo-guide eval ... --out DIR` (DIR/{SAMPLES_FILE})")
    read = read_jsonl(path, append_only=True, what="a sample row of `nemo-guide eval`")
    problems = []
    for line, row in read.rows:
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            looks = "; this looks like a records file (problem, answer)" if "problem" in row or "answer" in row else ""
            problems.append(f"{path}:{line}: no {', '.join(repr(f) for f in missing)} field: not a samples file from `nemo-guide eval`{looks}")
    if problems:
        raise DataError(problem_listing(f"{path} is not a samples file: pass the {SAMPLES_FILE} that `nemo-guide eval` writes", problems))
    return read.objects()


def _shown(value: Any) -> str:
    return "not recorded (written before samples named their source)" if value is None else repr(value)


def check_reuse(path: Path, rows: list[dict[str, Any]], source: SampleSource, prompts: dict[tuple[str, str, bool], str]) -> None:
    """Refuse to reuse ``rows`` of ``path`` unless every one was produced by ``source``, and
    every row of a problem in ``prompts`` (``(benchmark, id, guided) -> prompt_sha256``) from
    the same prompt text.

    Raises:
        RunError: listing each differing field (the values found, with their row counts, and
            this evaluation's value) and the fix: ``--fresh`` or ``--out``.
    """
    problems = []
    for name, value in source.fields().items():
        other = Counter(_shown(row.get(name)) for row in rows if row.get(name) != value)
        if other:
            found = ", ".join(f"{v} in {n} row(s)" for v, n in other.most_common(3))
            problems.append(f"{name}: {found}; this evaluation: {value!r}")
    changed = [row for row in rows if (key := (row["benchmark"], str(row["id"]), bool(row["guided"]))) in prompts and row.get(PROMPT_FIELD) != prompts[key]]
    if changed:
        e = changed[0]
        problems.append(
            f"{PROMPT_FIELD}: {len(changed)} row(s) were generated from another prompt text (data.prompt_style, data.hint_template, "
            f"data.system_prompt or the records changed), e.g. {e['benchmark']} id {e['id']!r}{' with hint' if e['guided'] else ''}"
        )
    if problems:
        raise RunError(
            problem_listing(f"{path} holds samples of another evaluation; samples are reused only when all of this matches", problems)
            + f"\nfix: --fresh to start over (the old file is kept as {path.name}.old-<timestamp>), or --out another directory"
        )


def move_aside(path: Path) -> Path | None:
    """Rename ``path`` to ``<name>.old-<timestamp>`` (never over another file); None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.old-{stamp}-{n}"), n + 1
    path.rename(target)
    return target
