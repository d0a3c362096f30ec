"""Run-directory checkpoints: written atomically, found, pruned, and checked against the config.

A checkpoint is a directory ``<run_dir>/checkpoints/step_000010/`` holding the backend's
files (``model.safetensors``, ``optimizer.pt``), ``state.json`` (step, data position,
counters, run history), ``rng.pt`` and ``config.json`` (the resolved config).

**Complete.** A checkpoint is complete when its directory is named exactly ``step_<digits>``
and holds ``state.json``. Both hold only once every file is written: the directory is
written as ``step_N.tmp-<pid>`` with ``state.json`` last, then renamed into place; a
checkpoint is deleted by renaming it to ``step_N.deleting-<pid>`` first. A kill at any
moment leaves complete checkpoints and leftovers under names never taken for complete;
:func:`remove_leftovers` removes those when the next run starts (under its lock).

**Corrupt.** A complete checkpoint whose file cannot be read (cut short by a full disk,
overwritten, copied partially) raises :class:`CorruptCheckpoint`, naming the file and the
checkpoint to use instead.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from nemo_guide.errors import RunError

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
TMP_MARK = ".tmp-"
DELETING_MARK = ".deleting-"
COMPLETE_FILE = "state.json"
"""Written last into a checkpoint's temporary directory; part of what makes it complete."""

STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d+)")
LEFTOVER_NAME = re.compile(rf".+(?:{re.escape(TMP_MARK)}(?:old-)?|{re.escape(DELETING_MARK)})\d+")
"""An unfinished write (``step_N.tmp-123``, ``config.json.tmp-123``) or deletion (``step_N.deleting-123``)."""

# Fields that may change when a run is resumed (how long and how often, not what is trained).
RESUMABLE_FIELDS = {
    "run.resume",
    "run.steps",
    "run.eval_every",
    "run.save_every",
    "run.keep_checkpoints",
    "run.log_every",
    "backend.device",
    "algorithm.old_logprobs",  # where pi_old comes from, not what it is
}


# Fields added after runs started saving config.json, each with the value that reproduces
# what those runs did: a saved config without the field compares as if it held that value.
ADDED_FIELDS = {
    "data.reward_workers": 1,  # one verifier process, as every run used before the field existed
    "algorithm.rollout_correction": "none",  # no mismatch correction, as before the field existed
    "algorithm.tis_cap": 2.0,
}


class CorruptCheckpoint(RunError):
    """A checkpoint file that cannot be read; the message names it and the checkpoint to use instead."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{STEP_PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (module docstring), oldest first; anything else is ignored."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        match = STEP_NAME.fullmatch(path.name)
        if match and path.is_dir() and (path / COMPLETE_FILE).is_file():
            out.append((int(match.group(1)), path))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_checkpoint(
    run_dir: Path,
    step: int,
    *,
    save_backend: Callable[[Path], None],
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step``'s checkpoint atomically, then delete all but the newest ``keep``."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + f"{TMP_MARK}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_backend(tmp)
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    (tmp / COMPLETE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")  # last
    if final.exists():  # the same step written again (a resumed run re-saving): replace it
        remove_checkpoint(final, then=lambda: os.replace(tmp, final))
    else:
        os.replace(tmp, final)
    for _, path in list_checkpoints(run_dir)[:-keep]:
        remove_checkpoint(path)
    return final


def remove_checkpoint(path: Path, then: Callable[[], None] | None = None) -> None:
    """Delete checkpoint ``path``: renamed to ``<name>.deleting-<pid>`` first, so a kill mid-way
    never leaves a half-deleted directory under a complete name; ``then`` runs between the
    rename and the deletion."""
    doomed = path.with_name(path.name + f"{DELETING_MARK}{os.getpid()}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    if then is not None:
        then()
    shutil.rmtree(doomed)


def leftovers(run_dir: Path) -> list[Path]:
    """Unfinished writes and deletions of killed runs, in ``run_dir`` and its ``checkpoints/``."""
    found = []
    for root in (Path(run_dir), checkpoint_dir(run_dir)):
        if root.is_dir():
            found += sorted(p for p in root.iterdir() if LEFTOVER_NAME.fullmatch(p.name))
    return found


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete :func:`leftovers`; only call this while holding the run directory's lock."""
    found = leftovers(run_dir)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def corrupt(path: Path, problem: str) -> CorruptCheckpoint:
    """The error for checkpoint file ``path`` that cannot be read because of ``problem``: it
    names the file and the complete checkpoint to use instead (the previous one, if any)."""
    path = Path(path)
    ckpt = path.parent
    message = f"{path} is corrupt ({problem}): it was cut short or overwritten, or is not a file of this kind."
    if ckpt.parent.name != CHECKPOINTS:
        return CorruptCheckpoint(message + " It is not in a run directory's checkpoints/, so there is no other checkpoint to suggest.")
    run_dir = ckpt.parent.parent
    match = STEP_NAME.fullmatch(ckpt.name)
    others = [(s, p) for s, p in list_checkpoints(run_dir) if p != ckpt]
    earlier = [p for s, p in others if match is None or s < int(match.group(1))]
    aside = f"move {ckpt} aside (mv {ckpt} {ckpt}.corrupt)"
    if earlier:
        return CorruptCheckpoint(
            message + f" Use the previous complete checkpoint instead, {earlier[-1]}: pass checkpoint={earlier[-1]} to nemo-guide eval; "
            f"to resume from it, {aside} and run again with run.resume=true."
        )
    if others:
        return CorruptCheckpoint(message + f" Use the other complete checkpoint {others[-1][1]} instead (checkpoint={others[-1][1]}).")
    return CorruptCheckpoint(
        message + f" {run_dir} holds no other complete checkpoint: {aside} and run the same command again, which starts the run over."
    )


def load_torch_file(path: Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``; a file that is not a readable torch file raises :class:`CorruptCheckpoint`."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except EOFError:
        raise corrupt(path, "empty, or cut short") from None
    except pickle.UnpicklingError:
        raise corrupt(path, "not a torch file: unpickling failed") from None
    except RuntimeError as exc:
        raise corrupt(path, f"not a readable torch file: {_first_line(exc)}") from None


def read_checkpoint(path: Path, *, restore_rng: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, config)`` of a checkpoint directory; restores the torch RNG state (unless ``restore_rng=False``).

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory.
        CorruptCheckpoint: one of its files cannot be read.
    """
    path = Path(path)
    state_file = path / COMPLETE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no state.json); pass a directory like runs/<name>/checkpoints/step_000010")
    documents = []
    for file in (state_file, path / "config.json"):
        try:
            documents.append(json.loads(file.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise corrupt(file, f"not valid JSON: {_first_line(exc)}") from None
    rng = load_torch_file(path / "rng.pt")
    if restore_rng:
        torch.set_rng_state(rng["torch"])
    return documents[0], documents[1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: set[str] = RESUMABLE_FIELDS) -> list[str]:
    """``key: saved -> current`` for every field that differs (except ``ignore``).

    Values are compared as plain JSON data (choices are plain strings on both sides); a
    field of :data:`ADDED_FIELDS` missing from either side takes its listed value.
    """
    a, b = {**ADDED_FIELDS, **_flatten(saved)}, {**ADDED_FIELDS, **_flatten(current)}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f"{TMP_MARK}{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
