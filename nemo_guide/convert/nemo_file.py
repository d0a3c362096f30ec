"""The ``.nemo`` file of a NeMo 2.1 ``MegatronGPTModel`` (mcore GPT): its layout and its config.

Pure Python (OmegaConf for YAML, ``tarfile``): no torch.distributed, NeMo or Megatron import.
The weights inside are written and read by ``nemo_guide.backends.megatron.nemo_checkpoint``.

A ``.nemo`` is an uncompressed tar whose members are named ``./<name>``, as NeMo's
``SaveRestoreConnector._make_nemo_file_from_folder`` writes them (``tar.add(folder, arcname=".")``):

- ``model_config.yaml``: the model section of a NeMo config, read by
  ``MegatronGPTModel.restore_from`` in struct mode (:func:`nemo_model_config`);
- ``model_weights/``: a megatron-core distributed checkpoint (``torch_dist``: ``metadata.json``,
  ``common.pt``, ``*.distcp``) with the keys of ``MegatronGPTModel.sharded_state_dict()``, which
  are megatron-core's ``GPTModel.sharded_state_dict(prefix="model.")``: every layer stacked on a
  leading layer axis (``model.decoder.layers.self_attention.linear_qkv.weight`` of shape
  ``[num_layers, ...]``) under the TransformerEngine names (``...linear_qkv.layer_norm_weight``);
- ``hf_config.json`` and ``hf/`` (this package's additions, ignored by NeMo): the original
  Hugging Face ``config.json`` byte for byte, and the tokenizer and generation files, so that
  ``nemo-to-hf`` needs nothing else.

The vocabulary is never padded: ``override_vocab_size`` is the Hugging Face ``vocab_size`` (NeMo
then builds exactly that many embedding rows) and ``make_vocab_size_divisible_by`` is the largest
power of two up to 128 dividing it, so NeMo's own padding rule gives the same size as well.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nemo_guide.convert.errors import ConvertError
from nemo_guide.convert.shape import ModelShape

MODEL_CONFIG = "model_config.yaml"
MODEL_WEIGHTS = "model_weights"
HF_CONFIG = "hf_config.json"
HF_FILES = "hf"
NEMO_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
NEMO_VERSION = "2.1.0"
# NeMo's ``precision`` for each weight dtype written.
PRECISION = {"float32": 32, "bfloat16": "bf16", "float16": 16}


def vocab_divisor(vocab_size: int) -> int:
    """The largest power of two <= 128 that divides ``vocab_size`` (NeMo's padding multiple that pads nothing)."""
    divisor = 128
    while vocab_size % divisor:
        divisor //= 2
    return divisor


def nemo_model_config(shape: ModelShape, hf_config: dict[str, Any], *, dtype: str, tokenizer: str) -> dict[str, Any]:
    """The ``model_config.yaml`` of a ``MegatronGPTModel`` equal to the Hugging Face model ``shape``.

    ``tokenizer`` is what NeMo hands ``transformers.AutoTokenizer.from_pretrained``: a directory
    or a Hub name (NeMo 2.1 passes ``tokenizer.type`` through as is; see the README).
    Every key NeMo 2.1 reads without a default in struct mode is present. The fusions, Apex
    and TransformerEngine are off, so the file loads on any machine; a GPU job may switch them
    on in its own config (the checkpoint keys are TransformerEngine's either way).
    """
    if dtype not in PRECISION:
        raise ConvertError(f"dtype = {dtype!r}: choose one of {', '.join(PRECISION)}")
    return {
        "target": NEMO_TARGET,
        "nemo_version": NEMO_VERSION,
        "mcore_gpt": True,
        "precision": PRECISION[dtype],
        # parallel layout and batch sizes: the run's config overrides them (any layout loads)
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None,
        # architecture
        "encoder_seq_length": shape.max_position_embeddings,
        "max_position_embeddings": shape.max_position_embeddings,
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_query_groups": shape.num_kv_heads,
        "kv_channels": shape.head_dim,
        "init_method_std": float(hf_config.get("initializer_range", 0.02)),
        "use_scaled_init_method": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "ffn_dropout": 0.0,
        "normalization": "rmsnorm",
        "layernorm_epsilon": shape.rms_norm_eps,
        "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": vocab_divisor(shape.vocab_size),
        "override_vocab_size": shape.vocab_size,
        "pre_process": True,
        "post_process": True,
        "bias": False,
        "qkv_bias": shape.qkv_bias,
        "activation": "fast-swiglu",
        "headscale": False,
        "transformer_block_type": "pre_ln",
        "openai_gelu": False,
        "normalize_attention_scores": True,
        "apply_query_key_layer_scaling": False,
        "position_embedding_type": "rope",
        "rotary_percentage": 1.0,
        "rotary_base": shape.rope_theta,
        "scale_positional_embedding": shape.rope_llama3_scaling,
        "attention_type": "multihead",
        "share_embeddings_and_output_weights": shape.tie_word_embeddings,
        "tokenizer": {
            "library": "huggingface",
            "type": tokenizer,
            "use_fast": True,
            "model": None,
            "vocab_file": None,
            "merge_file": None,
            "delimiter": None,
            "sentencepiece_legacy": False,
        },
        # precision and fusions (CUDA kernels; a GPU run may enable them)
        "megatron_amp_O2": False,
        "native_amp_init_scale": 4294967296,
        "native_amp_growth_interval": 1000,
        "hysteresis": 2,
        "fp32_residual_connection": False,
        "fp16_lm_cross_entropy": False,
        "grad_div_ar_fusion": False,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": False,
        "get_attention_mask_from_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "transformer_engine": False,
        "fp8": False,
        "sequence_parallel": False,
        "seed": 1234,
        "use_cpu_initialization": False,
        "onnx_safe": False,
        "apex_transformer_log_level": 30,
        "gradient_as_bucket_view": True,
        "sync_batch_comm": False,
        "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None,
        "activations_checkpoint_num_layers": None,
        "num_micro_batches_with_partial_activation_checkpoints": None,
        "activations_checkpoint_layers_per_pipeline": None,
        "dist_ckpt_format": "torch_dist",
        # read when the model is built; a training run's config replaces it
        "optim": {"name": "fused_adam", "lr": 1.0e-5, "weight_decay": 0.0, "betas": [0.9, 0.98]},
    }


def write_model_config(config: dict[str, Any], path: Path) -> None:
    """``config`` as YAML that ``OmegaConf.load`` reads back equal."""
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))


def read_model_config(folder: Path, source: str) -> dict[str, Any]:
    """The ``model_config.yaml`` of an unpacked ``.nemo``, checked to be an mcore GPT model.

    ``source`` names the ``.nemo`` in errors.
    """
    path = folder / MODEL_CONFIG
    if not path.is_file():
        raise ConvertError(f"{source}: no {MODEL_CONFIG}; not a .nemo file of a NeMo model")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(config, dict):
        raise ConvertError(f"{source}: {MODEL_CONFIG} is not a mapping")
    config = config.get("model", config)  # a full training config holds the model under `model`
    if not config.get("mcore_gpt", False):
        raise ConvertError(f"{source}: {MODEL_CONFIG} has mcore_gpt = {config.get('mcore_gpt')!r}; only megatron-core GPT "
                           "checkpoints (mcore_gpt: True) are read, not legacy NeMo Megatron ones")
    return config


def nemo_weights_dir(folder: Path, source: str) -> Path:
    """The distributed checkpoint directory of an unpacked ``.nemo``."""
    weights = folder / MODEL_WEIGHTS
    if not (weights / "metadata.json").is_file():
        raise ConvertError(f"{source}: no {MODEL_WEIGHTS}/metadata.json; only .nemo files holding a megatron-core "
                           "distributed checkpoint are read (not per-rank model_weights.ckpt files)")
    return weights


def stored_hf_config(folder: Path, hf_config: str | Path | None, source: str) -> tuple[dict[str, Any], Path]:
    """``(config dict, path)`` of the Hugging Face config: ``hf_config`` if given, else the one in the ``.nemo``."""
    path = Path(hf_config) if hf_config is not None else folder / HF_CONFIG
    if not path.is_file():
        raise ConvertError(f"{source}: no {HF_CONFIG} inside (it was not written by `nemo-guide convert hf-to-nemo`); "
                           "pass --hf-config with the original model's config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None
    return config, path


def pack_nemo(folder: Path, out_path: Path) -> Path:
    """Tar ``folder`` into ``out_path`` as NeMo does (uncompressed, members ``./<name>``), atomically.

    Writes ``<out_path>.tmp`` and renames it; refuses an existing ``out_path``.
    """
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; choose a new output file (nothing is overwritten)")
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with tarfile.open(tmp, "w:") as tar:
            tar.add(folder, arcname=".", filter=_plain_member)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner names or ids in the archive (they mean nothing on another machine)."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack_nemo(path: Path, out_folder: Path) -> Path:
    """Extract the ``.nemo`` file ``path`` into ``out_folder`` (safely: no links, nothing outside it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .nemo file")
    try:
        with tarfile.open(path, "r:*") as tar:  # NeMo writes plain tars; old files were gzipped
            tar.extractall(out_folder, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ConvertError(f"{path}: cannot be read as a .nemo (tar) file: {exc}") from None
    return out_folder


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the files ``names`` that exist in ``src`` into ``dst`` (created); return the names copied."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def read_nemo_config(path: Path) -> dict[str, Any]:
    """The ``model_config.yaml`` of a ``.nemo`` file, read without extracting the weights."""
    try:
        with tarfile.open(path, "r:*") as tar:
            member = next((m for m in tar.getmembers() if m.name in (MODEL_CONFIG, f"./{MODEL_CONFIG}")), None)
            if member is None:
                raise ConvertError(f"{path}: no {MODEL_CONFIG} inside; is it a NeMo 2.1 .nemo file?")
            return OmegaConf.to_container(OmegaConf.create(tar.extractfile(member).read().decode("utf-8")), resolve=True)
    except (tarfile.TarError, OSError) as exc:
        raise ConvertError(f"{path}: cannot be read as a .nemo (tar) file: {exc}") from None


def extract_tokenizer(path: Path, out_folder: Path) -> Path:
    """The Hugging Face tokenizer files bundled under ``./hf/`` by ``hf-to-nemo``, extracted into
    ``out_folder`` (only those members, safely); returns ``out_folder``.

    Raises:
        ConvertError: the file has no ``hf/`` folder (written by another converter: point
            ``model.tokenizer.type`` at the tokenizer directory instead).
    """
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.lstrip("./").startswith(f"{HF_FILES}/")]
            if not members:
                raise ConvertError(f"{path}: no bundled tokenizer ({HF_FILES}/); set model.tokenizer.type to the model's Hugging Face tokenizer directory")
            out_folder.mkdir(parents=True, exist_ok=True)
            for m in members:
                m.name = m.name.lstrip("./")[len(HF_FILES) + 1 :]
                tar.extract(m, out_folder, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ConvertError(f"{path}: cannot be read as a .nemo (tar) file: {exc}") from None
    return out_folder
