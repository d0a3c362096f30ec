"""Worker: the TensorRT-LLM engine weights of a NeMo Guide actor compute the actor's function.

A tiny Qwen2-like actor (``qkv_bias: true``) built the way Aligner builds it; each TP rank turns
its own state dict into its engine weights with ``rank_engine_weights`` (the function the GPU
engine wrapper builds and refits with: vocabulary gathered over TP, q/k/v biases, zero output
projection biases). Rank 0 runs TensorRT-LLM's Llama graph in plain torch
(``tests/trt_reference.py``) on every rank's weights and compares its logits with the actor's
own forward, with and without the attention bias in the engine config. Usage:
``trt_weights.py OUT TMPDIR`` (under torchrun for TP=2); writes ``OUT.rank<r>``.
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import actor_env

import torch
import torch.distributed as dist

rank, world_size = actor_env.world()
out, tmp = sys.argv[1], Path(sys.argv[2])
tp = world_size

from megatron.core import parallel_state

from nemo_guide.aligner.build import build_actor
from nemo_guide.aligner.trt_engine import rank_engine_weights
from nemo_guide.aligner.trt_export import engine_weight_shapes, trtllm_config
from trt_reference import engine_graph_logits

model_cfg = actor_env.model_config(actor_env.char_tokenizer(tmp / "tok"), tp=tp, hidden=32)
built = build_actor(actor_env.full_config(model_cfg, devices=world_size), optimizer_steps=1)
actor = built.actor
with torch.no_grad():  # biases as large as real Qwen2's (NeMo initialises them to zero)
    gen = torch.Generator().manual_seed(1 + parallel_state.get_tensor_model_parallel_rank())
    for name, p in actor.model.named_parameters():
        if name.endswith("linear_qkv.bias"):
            p.copy_(torch.randn(p.shape, generator=gen))
vocab = actor.tokenizer.vocab_size

weights = rank_engine_weights(actor.model.state_dict(), actor.cfg, vocab_size=vocab, device="cpu")
cfg = trtllm_config(actor.cfg, vocab_size=vocab, tp_size=tp, dtype="float32")
shapes_match = {k: tuple(v.shape) for k, v in weights.items()} == engine_weight_shapes(cfg)

tokens = torch.tensor([[1, 40, 41, 42, 5, 6, 7, 20, 21, 22]])
with torch.no_grad():
    attention_mask, _, position_ids = actor.get_ltor_masks_and_position_ids(tokens)
    local = actor.model(tokens, position_ids, attention_mask, labels=None)[0]  # [s, V/tp]
parts = [torch.empty_like(local) for _ in range(tp)]
dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
actor_logits = torch.cat(parts, -1).double()  # [s, V]

every = [None] * world_size
dist.all_gather_object(every, weights)
payload = {"shapes_match": shapes_match, "attn_bias": cfg["attn_bias"], "qkv_bias_abs": float(weights["transformer.layers.0.attention.qkv.bias"].abs().sum())}
if rank == 0:
    engine = engine_graph_logits(every, cfg, tokens[0])
    unfixed = engine_graph_logits(every, {**cfg, "attn_bias": False}, tokens[0])
    payload["logit_max_abs_diff"] = float((engine - actor_logits).abs().max())
    payload["logit_max_abs"] = float(actor_logits.abs().max())
    payload["unfixed_logprob_gap_mean"] = float((unfixed.log_softmax(-1) - actor_logits.log_softmax(-1)).abs().mean())
    payload["vocab"] = vocab
    assert math.isfinite(payload["logit_max_abs_diff"])
actor_env.write(out, rank, payload)
