"""Tiny Qwen2 / Llama checkpoints, a dual-context batch and the Hugging Face reference for
the Megatron tests, plus the worker that runs in each spawned gloo process."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_guide.backends.base import RolloutBatch, Totals
from nemo_guide.config import AlgorithmConfig

VOCAB = 64
FAMILIES = ("qwen2", "llama")


def hf_config(family: str):
    from transformers import LlamaConfig, Qwen2Config

    if family == "qwen2":  # tied embeddings, QKV bias, GQA 4/2
        return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0)
    # untied, head_dim 24 != hidden/heads, GQA 4/2, Llama 3.1 RoPE scaling
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=24, max_position_embeddings=16384, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})


def save_hf_model(family: str, path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed({"qwen2": 1, "llama": 2}[family])
    model = AutoModelForCausalLM.from_config(hf_config(family), torch_dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)


def make_batch(seed: int = 0) -> RolloutBatch:
    """7 rollouts of 3 prompts; rollouts 4-6 guided (a longer hinted prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    plain = [ids(5), ids(9), ids(3)]
    group = [0, 0, 1, 1, 2, 2, 2]
    guided = [False, False, False, False, True, True, True]
    plain_ids = [plain[i] for i in group]
    sample_ids = [p + ids(6) if gd else p for p, gd in zip(plain_ids, guided, strict=True)]
    lengths = [4, 7, 1, 6, 5, 3, 7]
    responses = [ids(n) for n in lengths]
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    mask[2] = False  # one rollout not trained on
    return RolloutBatch(
        plain_prompt_ids=plain_ids,
        sample_prompt_ids=sample_ids,
        response_ids=responses,
        guided=torch.tensor(guided),
        group=torch.tensor(group),
        rewards=torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
        loss_mask=mask,
        advantages=torch.tensor([-1.0, 1.0, 0.0, 0.7, 1.2, -0.8, 0.5]),
    )


def loss_fn():
    """The real Guide-GRPO surrogate (guided tokens unclipped) with an entropy bonus."""
    from nemo_guide.steps import policy_loss_fn

    return policy_loss_fn(AlgorithmConfig(entropy_coef=0.01, clip_low=0.1, clip_high=0.1), num_prompts=3)


def hf_reference(model_dir, batch: RolloutBatch):
    """Token-by-token reference from the Hugging Face model: unpadded forwards, one per rollout.

    Without ``old_logprobs``, the batch gets :func:`with_old_logprobs` of the reference's
    sampling-context log-probs. Returns ``(lp_plain [N, L], ent_plain [N, L], lp_sample [N, L],
    loss, metrics, grads)``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    width = batch.response_length

    def score(prompts):
        lp_rows, ent_rows = [], []
        for p, o in zip(prompts, batch.response_ids, strict=True):
            logits = model(torch.tensor([p + o])).logits[0, len(p) - 1 : len(p) - 1 + len(o)].float()
            logp = torch.log_softmax(logits, -1)  # [len(o), V]
            pad = (0, width - len(o))
            lp_rows.append(F.pad(logp.gather(-1, torch.tensor(o).unsqueeze(-1)).squeeze(-1), pad))
            ent_rows.append(F.pad(-(logp.exp() * logp).sum(-1), pad))
        return torch.stack(lp_rows), torch.stack(ent_rows)  # [N, L] each

    with torch.no_grad():
        lp_sample, _ = score(batch.sample_prompt_ids)
    if batch.old_logprobs is None:
        batch = with_old_logprobs(batch, lp_sample)
    lp_plain, ent_plain = score(batch.plain_prompt_ids)
    loss, metrics = loss_fn()(batch, lp_plain, ent_plain, Totals.of(batch))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return lp_plain.detach(), ent_plain.detach(), lp_sample, float(loss.detach()), {k: float(v) for k, v in metrics.items()}, grads


def with_old_logprobs(batch: RolloutBatch, lp_sample: torch.Tensor) -> RolloutBatch:
    """pi_old behind the sampling prompt, nudged so that some ratios leave the clip range."""
    g = torch.Generator().manual_seed(7)
    return batch.with_(old_logprobs=lp_sample + 0.3 * torch.randn(lp_sample.shape, generator=g))


def worker(rank: int, runs: dict, micro_batch_size: int, layer_spec: str = "local"):
    """Runs in each spawned process. ``runs``: family -> (model_dir, batch).

    Per family, through the host harness of ``megatron_schedule``: this rank's log-probs
    behind both contexts (the sampling one also the Aligner way: ``[b, s-1]`` log-probs from
    full logits, realigned), the loss metrics, this rank's gradients (local-spec names) and,
    on the last stage at PP=1, the output layer's logits shard of rollout 1's plain sequence.
    """
    from megatron.core import parallel_state

    import megatron_schedule as ms
    from nemo_guide.backends.megatron.model import MegatronModelConfig, load_hf_model

    out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    for family, (model_dir, batch) in runs.items():
        model, _ = load_hf_model(model_dir, MegatronModelConfig(dtype="float32", layer_spec=layer_spec))
        device = next(model.parameters()).device
        lp_plain, ent_plain = ms.logprobs(model, batch, "plain", micro_batch_size=micro_batch_size, with_entropy=True)
        lp_sample, _ = ms.logprobs(model, batch, "sample", micro_batch_size=micro_batch_size)
        lp_sample_aligner = ms.sample_logprobs_via_aligner_layout(model, batch, micro_batch_size=micro_batch_size)
        metrics = ms.forward_backward(model, batch, loss_fn(), micro_batch_size=micro_batch_size, with_entropy=True)
        grads = {k: p.grad.detach().cpu() for k, p in model.named_parameters() if p.grad is not None}
        logits = None
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            tokens = torch.tensor([batch.plain_prompt_ids[1] + batch.response_ids[1]], device=device)
            with torch.no_grad():
                logits = model(tokens, torch.arange(tokens.shape[1], device=device).unsqueeze(0), None)[0].cpu()  # [s, V/tp]
        out[family] = {"lp_plain": lp_plain, "ent_plain": ent_plain, "lp_sample": lp_sample, "lp_sample_aligner": lp_sample_aligner,
                       "metrics": metrics, "grads": grads, "logits": logits}
    return out


def dist_checkpoint_worker(rank: int, ckpt_in: str, ckpt_out: str, batch: RolloutBatch):
    """Load a distributed checkpoint into this layout, score ``batch``, save it again."""
    import megatron_schedule as ms
    from nemo_guide.backends.megatron.checkpoint import load_model, save_model
    from nemo_guide.backends.megatron.model import MegatronModelConfig, build_model

    shape, _ = read_hf_shape_from_ckpt(ckpt_in)
    model = build_model(shape, MegatronModelConfig(dtype="float32", layer_spec="local"))
    load_model(model, ckpt_in)
    lp, _ = ms.logprobs(model, batch, "sample", micro_batch_size=4)
    save_model(model, ckpt_out)
    return lp


def read_hf_shape_from_ckpt(ckpt_dir: str):
    import json
    from pathlib import Path

    from nemo_guide.convert import shape_from_hf_config

    config = json.loads((Path(ckpt_dir) / "hf_config.json").read_text())
    return shape_from_hf_config(config), config
