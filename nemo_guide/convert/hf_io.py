"""Read and write Hugging Face checkpoint directories with safetensors (no transformers).

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Writing goes to a temporary directory renamed into place,
so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_guide.convert.mapping import StateDict

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tokenizer and generation files copied alongside converted weights when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def load_hf_state_dict(model_dir: str | Path) -> StateDict:
    """Every tensor of the checkpoint in ``model_dir`` (single file or sharded)."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (model_dir / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{model_dir}: neither {SINGLE} nor {INDEX}; only safetensors checkpoints are read")
    out: StateDict = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def save_hf_checkpoint(out_dir: str | Path, state: StateDict, config: dict, *, copy_from: str | Path | None = None,
                       max_shard_bytes: int = 5 * 2**30, config_file: str | Path | None = None) -> Path:
    """Write ``state`` and ``config`` as a Hugging Face directory (sharded above ``max_shard_bytes``).

    Refuses to overwrite an existing ``out_dir``. Tokenizer files are copied from ``copy_from``.
    With ``config_file``, that file is copied byte for byte as ``config.json`` instead of ``config``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new output directory (nothing is overwritten)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards, start=1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if config_file is not None:
        shutil.copy2(config_file, tmp / "config.json")
    else:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if copy_from is not None:
        for name in SIDE_FILES:
            if (Path(copy_from) / name).is_file():
                shutil.copy2(Path(copy_from) / name, tmp / name)
    os.replace(tmp, out_dir)
    return out_dir
