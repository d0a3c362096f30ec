"""Megatron-core distributed checkpoints of a ``GPTModel``, and conversion to/from Hugging Face.

A distributed checkpoint (``megatron.core.dist_checkpointing``, backend ``torch_dist``)
stores each tensor once with its global shape, so it loads under any TP/PP layout. The
directory written by :func:`hf_to_megatron_checkpoint` also holds ``hf_config.json`` and the
tokenizer files under ``hf/``, so that :func:`megatron_to_hf_checkpoint` needs nothing else.

Saving uses a synchronous writer (``_SyncTorchDistSave``): megatron-core 0.10's own
``torch_dist`` writer forks a process, calls ``torch.cuda.synchronize()`` and uses a
private torch API whose signature changed in torch 2.7; this one produces the same format
through ``torch.distributed.checkpoint.save`` and Megatron's planner, on CPU or GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from nemo_guide.backends.megatron._mcore import (
    GPTModel,
    MCoreSavePlanner,
    SaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    dist_checkpointing,
    mcore_to_pyt_state_dict,
    parallel_state,
)
from nemo_guide.backends.megatron.model import MegatronModelConfig, build_model, load_rank_weights
from nemo_guide.convert import hf_to_megatron, load_hf_state_dict, megatron_to_hf, read_hf_shape, save_hf_checkpoint, shape_from_hf_config
from nemo_guide.convert.hf_io import SIDE_FILES
from nemo_guide.convert.mapping import from_te_names

HF_CONFIG = "hf_config.json"
HF_FILES = "hf"


def _save_strategy():
    class _SyncTorchDistSave(SaveShardedStrategy):
        """``torch_dist`` format, written synchronously by torch's own FileSystemWriter."""

        @property
        def can_handle_sharded_objects(self) -> bool:
            return True

        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt = mcore_to_pyt_state_dict(flat, False)
            dcp.save(pyt, storage_writer=dcp.FileSystemWriter(str(checkpoint_dir)), planner=MCoreSavePlanner(dedup_replicated_tensors=False))

    return _SyncTorchDistSave("torch_dist", 1)


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new output directory (nothing is overwritten)")


def save_model(model: GPTModel, directory: str | Path, *, prefix: str = "") -> None:
    """Write ``model`` (every rank's part; call on all ranks) as a distributed checkpoint.

    Every key starts with ``prefix`` (``"model."`` in a ``.nemo``, as NeMo's ``MegatronGPTModel``
    names them). The checkpoint is written to ``<directory>.tmp`` and renamed by rank 0, so a
    crash never leaves a half-written checkpoint under ``directory``. Refuses an existing ``directory``.
    """
    directory = Path(directory)
    _refuse_existing(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(prefix=prefix), str(tmp), sharded_strategy=_save_strategy())
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(tmp, directory)
    dist.barrier()


def load_model(model: GPTModel, directory: str | Path, *, prefix: str = "") -> None:
    """Load a distributed checkpoint (keys starting with ``prefix``) into this rank's ``model``
    (any TP/PP layout; all ranks)."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory}: not a Megatron-core distributed checkpoint (no metadata.json)")
    state = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), str(directory))
    state = {key[len(prefix):]: value for key, value in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{directory} does not fit the model: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def single_process_group():
    """A world of one (gloo) with TP = PP = 1, unless torch.distributed is already set up."""
    own = not dist.is_initialized()
    if own:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in one process; start it without torchrun/srun")
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if own:
            dist.destroy_process_group()


def hf_to_megatron_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Convert a Hugging Face Qwen2/Llama directory into a Megatron-core distributed checkpoint.

    Runs in one process on CPU; peak memory is about twice the model in ``dtype``.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _refuse_existing(out_dir)
    shape, config = read_hf_shape(hf_dir)
    with single_process_group():
        model = build_model(shape, MegatronModelConfig(dtype=dtype, layer_spec="local"), device="cpu")
        full = hf_to_megatron(load_hf_state_dict(hf_dir), shape, source=str(hf_dir))
        load_rank_weights(model, full, shape)
        del full
        save_model(model, out_dir)
    (out_dir / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / HF_FILES).mkdir()
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / HF_FILES / name)
    return out_dir


def megatron_to_hf_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, hf_config: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert a distributed checkpoint back into a Hugging Face directory (safetensors).

    ``hf_config`` defaults to the ``hf_config.json`` that :func:`hf_to_megatron_checkpoint`
    stored; pass the original model's ``config.json`` for checkpoints written elsewhere.
    """
    ckpt_dir = Path(ckpt_dir)
    _refuse_existing(Path(out_dir))
    config_path = Path(hf_config) if hf_config else ckpt_dir / HF_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; pass --hf-config with the original model's config.json")
    config = json.loads(config_path.read_text())
    shape = shape_from_hf_config(config, source=str(config_path))
    with single_process_group():
        model = build_model(shape, MegatronModelConfig(dtype=dtype, layer_spec="local"), device="cpu")
        load_model(model, ckpt_dir)
        state = {k: v for k, v in from_te_names(model.state_dict()).items() if isinstance(v, torch.Tensor)}
        hf = megatron_to_hf(state, shape, source=str(ckpt_dir))
    config = {**config, ("dtype" if "dtype" in config else "torch_dtype"): dtype}
    return save_hf_checkpoint(out_dir, {k: v.clone() for k, v in hf.items()}, config, copy_from=ckpt_dir / HF_FILES)
