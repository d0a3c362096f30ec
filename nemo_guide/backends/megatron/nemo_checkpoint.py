"""Hugging Face Qwen2/Llama <-> NeMo 2.1 ``.nemo`` files (mcore GPT), with megatron-core only.

No NeMo import: the conversion runs wherever megatron-core 0.10 does (a login node, one CPU
process). The weights go through a megatron-core ``GPTModel`` built with the local layer spec,
whose ``sharded_state_dict(prefix="model.")`` gives exactly the keys NeMo's
``MegatronGPTModel.sharded_state_dict()`` asks for; the file layout and config are in
``nemo_guide.convert.nemo_file``.

HF -> ``.nemo`` -> HF is bit-exact in the default ``dtype="auto"`` (the weights keep their
dtype), and ``config.json`` and the tokenizer files come back byte for byte.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from nemo_guide.backends.megatron._mcore import dist_checkpointing
from nemo_guide.backends.megatron.checkpoint import load_model, save_model, single_process_group
from nemo_guide.backends.megatron.model import MegatronModelConfig, build_model, load_rank_weights
from nemo_guide.convert import hf_to_megatron, load_hf_state_dict, megatron_to_hf, read_hf_shape, save_hf_checkpoint, shape_from_hf_config
from nemo_guide.convert.errors import ConvertError
from nemo_guide.convert.hf_io import SIDE_FILES
from nemo_guide.convert.mapping import from_te_names
from nemo_guide.convert.nemo_file import (
    HF_CONFIG,
    HF_FILES,
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    copy_side_files,
    nemo_model_config,
    nemo_weights_dir,
    pack_nemo,
    read_model_config,
    stored_hf_config,
    unpack_nemo,
    write_model_config,
)
from nemo_guide.convert.shape import ModelShape

PREFIX = "model."
EMBEDDING = PREFIX + "embedding.word_embeddings.weight"
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Any of these makes a directory loadable by transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _dtype_name(dtype: torch.dtype, source: str) -> str:
    if dtype not in _NAMES:
        raise ConvertError(f"{source}: weights in {dtype}; only {', '.join(_NAMES.values())} are written to a .nemo. "
                           "Pass --dtype float32|bfloat16|float16 to cast them")
    return _NAMES[dtype]


def _staging(out: Path) -> Path:
    """A scratch directory next to ``out`` (same file system: large checkpoints do not fit /tmp)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))


def _tokenizer_source(hf_dir: Path, tokenizer: str | None) -> str:
    if tokenizer is not None:
        return tokenizer
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ConvertError(f"{hf_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); NeMo cannot build the model "
                           "without a tokenizer. Pass --tokenizer with a tokenizer directory or Hub name")
    return str(hf_dir.resolve())


def hf_to_nemo_checkpoint(hf_dir: str | Path, out_path: str | Path, *, dtype: str = "auto", tokenizer: str | None = None) -> Path:
    """Convert a Hugging Face Qwen2/Llama directory into a NeMo 2.1 ``.nemo`` file.

    ``dtype``: ``auto`` keeps the checkpoint's dtype (that of its embedding; bit-exact), else
    ``float32``/``bfloat16``/``float16``; every tensor is written in it. ``tokenizer``: the
    ``tokenizer.type`` NeMo will load (default: ``hf_dir``, made absolute); the tokenizer files
    of ``hf_dir`` travel inside the file either way. One CPU process; peak memory about twice the
    model, disk about twice the file.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; choose a new output file (nothing is overwritten)")
    shape, config = read_hf_shape(hf_dir)
    tokenizer = _tokenizer_source(hf_dir, tokenizer)
    hf_state = load_hf_state_dict(hf_dir)
    full = hf_to_megatron(hf_state, shape, source=str(hf_dir))
    if dtype == "auto":
        dtype = _dtype_name(full["embedding.word_embeddings.weight"].dtype, str(hf_dir))
    staging = _staging(out_path)
    try:
        with single_process_group():
            model_config = MegatronModelConfig(dtype=dtype, layer_spec="local")
            model = build_model(shape, model_config, device="cpu")
            load_rank_weights(model, full, shape)
            del full, hf_state
            model.to(model_config.torch_dtype)  # the local spec's norms are built in float32
            save_model(model, staging / MODEL_WEIGHTS, prefix=PREFIX)
        write_model_config(nemo_model_config(shape, config, dtype=dtype, tokenizer=tokenizer), staging / MODEL_CONFIG)
        shutil.copy2(hf_dir / "config.json", staging / HF_CONFIG)
        copy_side_files(hf_dir, staging / HF_FILES, SIDE_FILES)
        return pack_nemo(staging, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_same_model(nemo: dict, shape: ModelShape, source: str) -> None:
    """Raise naming every architecture field where ``model_config.yaml`` and the HF config disagree."""
    heads = nemo.get("num_attention_heads")
    expected = {
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_query_groups": shape.num_kv_heads,
        "kv_channels": shape.head_dim,
        "share_embeddings_and_output_weights": shape.tie_word_embeddings,
        "qkv_bias": shape.qkv_bias,
    }
    got = dict(nemo)
    if got.get("num_query_groups") is None:
        got["num_query_groups"] = heads
    if got.get("kv_channels") is None and heads:
        got["kv_channels"] = nemo.get("hidden_size", 0) // heads
    # NeMo's defaults for keys a config may leave out
    for key, default in (("share_embeddings_and_output_weights", True), ("qkv_bias", False), ("rotary_base", 10000),
                         ("scale_positional_embedding", False), ("layernorm_epsilon", 1e-5)):
        got.setdefault(key, default)
    expected.update(rotary_base=shape.rope_theta, scale_positional_embedding=shape.rope_llama3_scaling, layernorm_epsilon=shape.rms_norm_eps)
    bad = [f"{k} = {got.get(k)!r} (Hugging Face config: {v!r})" for k, v in expected.items() if got.get(k) != v]
    for key, default, allowed in (("bias", True, (False,)), ("normalization", "layernorm", ("rmsnorm",)),
                                  ("activation", "gelu", ("fast-swiglu", "swiglu")), ("position_embedding_type", "learned_absolute", ("rope",))):
        if nemo.get(key, default) not in allowed:
            bad.append(f"{key} = {nemo.get(key, default)!r}: a Qwen2/Llama model has {allowed[0]!r}")
    if bad:
        raise ConvertError(f"{source}: {MODEL_CONFIG} does not describe the model of the Hugging Face config: " + "; ".join(bad))


def _output_config(config: dict, config_path: Path, dtype: str) -> tuple[dict, Path | None]:
    """The HF config to write: the stored file unchanged when its dtype field already says ``dtype``."""
    field = "dtype" if "dtype" in config else "torch_dtype"
    if config.get(field) == dtype:
        return config, config_path
    return {**config, field: dtype}, None


def nemo_to_hf_checkpoint(nemo_path: str | Path, out_dir: str | Path, *, hf_config: str | Path | None = None, dtype: str = "auto") -> Path:
    """Convert a ``.nemo`` file (mcore GPT, Qwen2/Llama layout) into a Hugging Face directory.

    ``hf_config`` defaults to the ``hf_config.json`` that :func:`hf_to_nemo_checkpoint` stored;
    pass the original ``config.json`` for ``.nemo`` files written elsewhere (NeMo, a training run).
    Tokenizer files come from the ``.nemo``'s ``hf/``, else from the ``tokenizer.type`` directory
    of its config when that exists. Vocabulary rows beyond the HF ``vocab_size`` (NeMo's padding)
    are dropped. ``dtype``: ``auto`` keeps the stored dtype (the embedding's); every tensor is written in it.
    """
    nemo_path, out_dir = Path(nemo_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new output directory (nothing is overwritten)")
    if not nemo_path.is_file():
        raise FileNotFoundError(f"{nemo_path}: no such .nemo file")
    source = str(nemo_path)
    staging = _staging(out_dir)
    try:
        unpack_nemo(nemo_path, staging)
        nemo_config = read_model_config(staging, source)
        weights = nemo_weights_dir(staging, source)
        config, config_path = stored_hf_config(staging, hf_config, source)
        shape = shape_from_hf_config(config, source=str(config_path))
        _check_same_model(nemo_config, shape, source)
        metadata = dist_checkpointing.load_tensors_metadata(str(weights))
        if EMBEDDING not in metadata:
            raise ConvertError(f"{source}: the checkpoint has no {EMBEDDING!r}; keys start with "
                               f"{sorted(metadata)[:3]} (expected NeMo's mcore GPT keys, prefix {PREFIX!r})")
        rows = metadata[EMBEDDING].global_shape[0]
        if rows < shape.vocab_size:
            raise ConvertError(f"{source}: the embedding has {rows} rows, fewer than vocab_size = {shape.vocab_size} of {config_path}")
        if dtype == "auto":
            dtype = _dtype_name(metadata[EMBEDDING].dtype, source)
        built = dataclasses.replace(shape, vocab_size=rows)  # NeMo may have padded the vocabulary
        with single_process_group():
            model_config = MegatronModelConfig(dtype=dtype, layer_spec="local")
            model = build_model(built, model_config, device="cpu")
            load_model(model, weights, prefix=PREFIX)
            state = {k: v.to(model_config.torch_dtype) for k, v in from_te_names(model.state_dict()).items() if isinstance(v, torch.Tensor)}
            hf = megatron_to_hf(state, shape, source=source)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in hf:
                hf[key] = hf[key][: shape.vocab_size]
        config, config_file = _output_config(config, config_path, dtype)
        tokenizer_dir = staging / HF_FILES
        if not tokenizer_dir.is_dir():
            kind = (nemo_config.get("tokenizer") or {}).get("type")
            tokenizer_dir = Path(kind) if kind and Path(kind).is_dir() else None
        return save_hf_checkpoint(out_dir, {k: v.clone() for k, v in hf.items()}, config, copy_from=tokenizer_dir, config_file=config_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

