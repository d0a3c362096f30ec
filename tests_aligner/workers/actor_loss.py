"""Worker: the Guide actor's loss and gradients vs an independent reference on the same weights.

Actor path: ``get_loss_and_metrics`` (fused log-probs on hidden states, micro-batches of 2,
the policy loss callback). Reference path: the model's own vocab-parallel logits, Aligner's
``from_parallel_logits_to_logprobs``, ``realign`` to the response layout, one
``policy_loss_fn`` call on the whole batch. Usage: ``actor_loss.py OUT TMPDIR`` (under
torchrun for TP=2); writes ``OUT.rank<r>`` with the differences.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor_env

import torch

rank, world_size = actor_env.world()
out, tmp = sys.argv[1], Path(sys.argv[2])
tp = world_size

from nemo_aligner.utils.distributed import from_parallel_logits_to_logprobs

from nemo_guide.aligner.actor import GuideTrainBatch
from nemo_guide.aligner.build import build_actor
from nemo_guide.backends.base import RolloutBatch, Totals
from nemo_guide.backends.megatron.layout import lay_out, realign
from nemo_guide.config import AlgorithmConfig
from nemo_guide.steps import policy_loss_fn

cfg = actor_env.full_config(actor_env.model_config(actor_env.char_tokenizer(tmp / "tok"), tp=tp), devices=world_size)
built = build_actor(cfg, optimizer_steps=4)
actor = built.actor
actor.prepare_for_training()

gen = torch.Generator().manual_seed(0)
plain = [[1, 5, 6, 7], [1, 8, 9], [1, 5, 6, 7], [1, 10, 11, 12, 13], [1, 8, 9]]
hinted = [[1, 5, 6, 7], [1, 8, 9], [1, 40, 41, 42, 5, 6, 7], [1, 10, 11, 12, 13], [1, 43, 44, 8, 9]]
responses = [[20, 21, 22, 2], [23, 24], [25, 26, 27, 28, 29, 2], [30], [31, 32, 33]]
guided = torch.tensor([False, False, True, False, True])
width = max(len(r) for r in responses)
lengths = torch.tensor([len(r) for r in responses])
loss_mask = torch.arange(width)[None, :] < lengths[:, None]
batch = RolloutBatch(plain, hinted, responses, guided, torch.tensor([0, 1, 0, 2, 1]), torch.zeros(5), loss_mask,
                     advantages=torch.tensor([0.8, -1.1, 1.3, 0.4, -0.6]))
algo = AlgorithmConfig(clip_low=0.1, clip_high=0.1, entropy_coef=0.0)
loss_fn = policy_loss_fn(algo, num_prompts=3)


def reference_logprobs():
    rows = lay_out(batch.plain_prompt_ids, batch.response_ids, actor.tokenizer.eos_id)
    tokens = rows.tokens
    attention_mask, _, position_ids = actor.get_ltor_masks_and_position_ids(tokens)
    logits = actor.model(tokens, position_ids, attention_mask, labels=None)  # [b, s, V/tp]
    cols = from_parallel_logits_to_logprobs(vocab_parallel_logits=logits, target=tokens, higher_stability=True)  # [b, s-1]
    return realign(cols, rows.response_lengths, src_prompt_lengths=rows.prompt_lengths, dst_prompt_lengths=None, width=width)


# old log-probs: the current ones moved by +-0.4, so plain ratios fall on both sides of the clip range
with torch.no_grad():
    current = reference_logprobs()
old = current + (torch.rand(current.shape, generator=gen) - 0.5) * 0.8
batch = batch.with_(old_logprobs=torch.where(loss_mask, old, 0.0))

params = [p for p in actor.parameters() if p.requires_grad]
for p in params:
    p.grad = None
loss, metrics = actor.get_loss_and_metrics(GuideTrainBatch(batch, loss_fn, Totals.of(batch), micro_batch_size=2), forward_only=False)
actor_grads = [p.grad.clone() for p in params]

for p in params:
    p.grad = None
ref_loss, ref_metrics = loss_fn(batch, reference_logprobs(), None, Totals.of(batch))
ref_loss.backward()
ref_grads = [p.grad.clone() for p in params]

# the actor's fused path on the sampling context, without gradient
lp_sample, _ = actor.guide_logprobs(batch, "sample", micro_batch_size=2)

actor_env.write(out, rank, {
    "loss": float(loss), "ref_loss": float(ref_loss),
    "plain_clip_frac": ref_metrics["plain/clip_frac"].item(), "guided_token_frac": ref_metrics["guided/token_frac"].item(),
    "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(actor_grads, ref_grads, strict=True)),
    "grad_max_abs": max(float(b.abs().max()) for b in ref_grads),
    "logprob_plain_vs_ref": float((actor.guide_logprobs(batch, "plain")[0] - current).abs().max()),
    "sample_context_differs": float((lp_sample - current).abs().max()),
    "metric_keys": sorted(metrics),
})
