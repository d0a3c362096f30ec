"""Hugging Face <-> Megatron-core weights for Qwen2 and Llama: key maps and tensor splits.

Pure tensor code (torch + safetensors): it imports neither transformers nor Megatron.
The Megatron distributed-checkpoint I/O that uses these maps lives in
``nemo_guide.backends.megatron.checkpoint`` (and, for ``.nemo`` files, whose layout and
config ``nemo_file`` describes, ``nemo_guide.backends.megatron.nemo_checkpoint``).
"""

from nemo_guide.convert.hf_io import load_hf_state_dict, save_hf_checkpoint
from nemo_guide.convert.mapping import fuse_qkv, hf_to_megatron, megatron_to_hf, split_qkv, to_te_names
from nemo_guide.convert.parallel import merge_pipeline_stages, pipeline_stage, shard_tp, unshard_tp
from nemo_guide.convert.shape import ModelShape, read_hf_shape, shape_from_hf_config

__all__ = [
    "ModelShape",
    "fuse_qkv",
    "hf_to_megatron",
    "load_hf_state_dict",
    "megatron_to_hf",
    "merge_pipeline_stages",
    "pipeline_stage",
    "read_hf_shape",
    "save_hf_checkpoint",
    "shape_from_hf_config",
    "shard_tp",
    "split_qkv",
    "to_te_names",
    "unshard_tp",
]
