"""Worker: the Guide actor restored from one .nemo at PP=1 or PP=2 (world size = PP).

Usage: ``pp_loss.py OUT TMPDIR NEMO``. Scores a fixed dual-context batch (plain and hinted
contexts), trains one micro-batched loss without stepping, and writes the log-probs, the loss
metrics and the global gradient norm, so the test can compare the two layouts.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor_env

import torch

rank, world_size = actor_env.world()
out, tmp, nemo = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from nemo_guide.aligner.actor import GuideTrainBatch
from nemo_guide.aligner.build import build_actor
from nemo_guide.aligner.train import prepare
from nemo_guide.backends.base import RolloutBatch, Totals
from nemo_guide.config import AlgorithmConfig
from nemo_guide.steps import policy_loss_fn

model = actor_env.model_config(tmp / "unused", pp=world_size, micro_batch_size=2)
for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "qkv_bias", "tokenizer",
            "encoder_seq_length", "max_position_embeddings", "make_vocab_size_divisible_by", "normalization", "layernorm_epsilon", "kv_channels"):
    model.pop(key, None)  # from the .nemo
guide = dict(algorithm=dict(group_size=2), generation=dict(max_new_tokens=8), data=dict(prompt_batch_size=2, hint_template="H:{hint};{problem}"),
             run=dict(steps=1))
cfg = actor_env.full_config(model, devices=world_size, guide=guide)
cfg.pretrained_checkpoint.restore_from_path = nemo
prepare(cfg, source="pp_loss")  # merges the .nemo's model config and finds its tokenizer
built = build_actor(cfg, optimizer_steps=2)
actor = built.actor
actor.prepare_for_training()

plain = [[1, 53, 21, 24, 6, 22, 20, 32], [1, 53, 21, 25, 10, 23, 23, 32], [1, 53, 21, 20, 7, 26, 21, 32]]
hinted = [plain[0], [1, 43, 21, 10, 32, 27, 68, 14, 25, 69, 30] + plain[1][1:], plain[2]]
responses = [[36, 21, 22, 2], [36, 21, 24, 27, 29, 2], [36, 23, 2]]
guided = torch.tensor([False, True, False])
width = max(len(r) for r in responses)
lengths = torch.tensor([len(r) for r in responses])
mask = torch.arange(width)[None, :] < lengths[:, None]
batch = RolloutBatch(plain, hinted, responses, guided, torch.tensor([0, 1, 2]), torch.zeros(3), mask, advantages=torch.tensor([0.7, 1.2, -0.9]))
lp_plain, ent = actor.guide_logprobs(batch, "plain", with_entropy=True, micro_batch_size=2)
lp_sample, _ = actor.guide_logprobs(batch, "sample", micro_batch_size=2)
# old log-probs a little off the current ones (both sides of the clip range); the hinted context's
# log-probs are compared on their own above
old = lp_plain + 0.3 * torch.sin(torch.arange(lp_plain.numel(), dtype=torch.float32)).view_as(lp_plain)
batch = batch.with_(old_logprobs=torch.where(mask, old, 0.0))
loss_fn = policy_loss_fn(AlgorithmConfig(clip_low=0.2, clip_high=0.2), num_prompts=3)
for p in actor.parameters():
    p.grad = None
_, metrics = actor.get_loss_and_metrics(GuideTrainBatch(batch, loss_fn, Totals.of(batch), micro_batch_size=2), forward_only=False)
squares = torch.zeros(())
for p in actor.parameters():
    if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
        squares += p.grad.float().pow(2).sum()
dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
actor_env.write(out, rank, {"lp_plain": lp_plain.tolist(), "lp_sample": lp_sample.tolist(), "entropy": ent.tolist(),
                            "loss_policy": metrics["loss/policy"], "grad_norm": float(squares.sqrt()),
                            "stage": parallel_state.get_pipeline_model_parallel_rank()})
