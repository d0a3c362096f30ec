"""Configs and set-up for the actor/trainer tests: tiny random models built the way Aligner builds them.

Imported by the worker scripts (``tests_aligner/workers``), which run under ``torchrun`` (or
as plain processes at world size 1) and write what they measured to a file the test reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import nemo_cpu

nemo_cpu.install()

from omegaconf import OmegaConf

CHARS = ["<pad>", "<bos>", "<eos>", "\n"] + [chr(c) for c in range(32, 127)]


def char_tokenizer(directory: Path) -> Path:
    """A character-level Hugging Face tokenizer (vocab 128) written to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (directory / "tokenizer.json").is_file():
        return directory
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), 128)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>").save_pretrained(str(directory))
    return directory


def model_config(tokenizer_dir: Path, *, tp: int = 1, pp: int = 1, layers: int = 2, hidden: int = 32, qkv_bias: bool = True, tied: bool = False,
                 micro_batch_size: int = 2, global_batch_size: int = 8, seq_len: int = 64, lr: float = 1e-3) -> dict:
    """A NeMo 2.1 mcore GPT config of a tiny Qwen2-like (or Llama-like) model, every key NeMo reads spelled out."""
    return dict(
        mcore_gpt=True, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, rampup_batch_size=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        encoder_seq_length=seq_len, max_position_embeddings=seq_len, num_layers=layers, hidden_size=hidden, ffn_hidden_size=2 * hidden,
        num_attention_heads=4, num_query_groups=2, init_method_std=0.02, use_scaled_init_method=True, hidden_dropout=0.0,
        attention_dropout=0.0, ffn_dropout=0.0, kv_channels=None, apply_query_key_layer_scaling=False, normalization="rmsnorm",
        layernorm_epsilon=1e-6, do_layer_norm_weight_decay=False, make_vocab_size_divisible_by=1, pre_process=True, post_process=True,
        persist_layer_norm=False, bias=False, qkv_bias=qkv_bias, activation="fast-swiglu", headscale=False, transformer_block_type="pre_ln",
        openai_gelu=False, normalize_attention_scores=True, position_embedding_type="rope", rotary_percentage=1.0, rotary_base=10000,
        attention_type="multihead", share_embeddings_and_output_weights=tied, overlap_p2p_comm=False, batch_p2p_comm=True,
        num_layers_per_virtual_pipeline_stage=None, tokenizer=dict(library="huggingface", type=str(tokenizer_dir), use_fast=True),
        native_amp_init_scale=4294967296, native_amp_growth_interval=1000, hysteresis=2, fp32_residual_connection=False,
        fp16_lm_cross_entropy=False, megatron_amp_O2=False, grad_allreduce_chunk_size_mb=125, grad_div_ar_fusion=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_add_fusion=False, masked_softmax_fusion=False,
        get_attention_mask_from_fusion=True, apply_rope_fusion=False, seed=1234, resume_from_checkpoint=None, use_cpu_initialization=True,
        onnx_safe=False, apex_transformer_log_level=30, gradient_as_bucket_view=False, sync_batch_comm=False,
        activations_checkpoint_granularity=None, activations_checkpoint_method=None, activations_checkpoint_num_layers=None,
        num_micro_batches_with_partial_activation_checkpoints=None, activations_checkpoint_layers_per_pipeline=None,
        sequence_parallel=False, transformer_engine=False, fp8=False, use_flash_attention=False, cpu_offloading=False, precision=32,
        dist_ckpt_format="torch_dist",
        optim=dict(name="adam", lr=lr, weight_decay=0.0, betas=[0.9, 0.999]),
        data=dict(data_prefix=None, seq_length=seq_len),
        ppo=dict(rollout_micro_batch_size=4, num_rollout_samples=8, forward_micro_batch_size=micro_batch_size,
                 val_rollout_micro_batch_size=4, num_val_samples=8, offload_adam_states=False, entropy_bonus=0.0, ratio_eps=0.2,
                 sampling_params=dict(use_greedy=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, add_BOS=False,
                                      all_probs=False, compute_logprob=False, end_strings=["<eos>"]),
                 length_params=dict(max_length=16, min_length=0), trt_llm=dict(enable=False)),
        peft=dict(peft_scheme="none"),
    )


def full_config(model: dict, *, devices: int = 1, exp_dir: Path | None = None, guide: dict | None = None) -> "OmegaConf":
    exp = None
    if exp_dir is not None:
        exp = dict(explicit_log_dir=str(exp_dir), exp_dir=None, name="guide", create_wandb_logger=False, create_tensorboard_logger=False,
                   resume_if_exists=True, resume_ignore_no_checkpoint=True, create_checkpoint_callback=True,
                   checkpoint_callback_params=dict(monitor="step", save_top_k=2, mode="max", always_save_nemo=False,
                                                   save_nemo_on_train_end=False, filename="guide-{step}", model_parallel_size=model["tensor_model_parallel_size"] * model["pipeline_model_parallel_size"]))
    return OmegaConf.create(dict(
        trainer=dict(num_nodes=1, devices=devices, accelerator="cpu", precision=32, logger=False, enable_checkpointing=False,
                     use_distributed_sampler=False, max_steps=-1, max_epochs=1, enable_progress_bar=False, guide=guide or {}),
        exp_manager=exp,
        pretrained_checkpoint=dict(restore_from_path=None),
        model=model,
    ))


def world() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (a world of one without it)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_PORT", str(nemo_cpu.free_port()))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def write(path: str | Path, rank: int, payload: dict) -> None:
    Path(f"{path}.rank{rank}").write_text(json.dumps(payload))
