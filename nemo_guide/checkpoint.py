"""Run-directory checkpoints: written atomically, found, pruned, and checked against the config.

A checkpoint is a directory ``<run_dir>/checkpoints/step_000010/`` holding the backend's
files (``model.safetensors``, ``optimizer.pt``), ``state.json`` (step, data position,
counters, run history), ``rng.pt`` and ``config.json`` (the resolved config). It is
written under a temporary name and renamed into place, so a run killed mid-write leaves
either the previous checkpoints or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

STEP_PREFIX = "step_"
TMP_MARK = ".tmp-"

# Fields that may change when a run is resumed (how long and how often, not what is trained).
RESUMABLE_FIELDS = {
    "run.resume",
    "run.steps",
    "run.eval_every",
    "run.save_every",
    "run.keep_checkpoints",
    "run.log_every",
    "backend.device",
}


# Fields added after runs started saving config.json, each with the value that reproduces
# what those runs did: a saved config without the field compares as if it held that value.
ADDED_FIELDS = {
    "data.reward_workers": 1,  # one verifier process, as every run used before the field existed
}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{STEP_PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (leftover temporary directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith(STEP_PREFIX) and TMP_MARK not in name and (path / "state.json").is_file():
            try:
                out.append((int(name[len(STEP_PREFIX):]), path))
            except ValueError:
                continue
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
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    if final.exists():  # the same step written again (a resumed run re-saving): replace it
        old = final.with_name(final.name + f"{TMP_MARK}old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, config)`` of a checkpoint directory; restores the torch RNG state."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no state.json); pass a directory like runs/<name>/checkpoints/step_000010")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return state, config


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
