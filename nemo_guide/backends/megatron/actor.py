"""The Megatron actor: dual-context response log-probs and policy-loss backward.

One instance per rank, holding that rank's pipeline stage. Both entry points run
Megatron-core's own pipeline schedule (``get_forward_backward_func``: no pipelining at
``pp = 1``, 1F1B otherwise) over equal-shape micro-batches:

- :meth:`MegatronActor.logprobs`: ``log pi(o_t | prompt of context, o_<t)`` for every
  response token, behind the plain or the sampling prompt (DESIGN section 3), no grad;
- :meth:`MegatronActor.forward_backward`: the policy loss of a mini-batch scored behind
  the plain prompt, gradients accumulated into ``param.grad`` on every rank.

Log-probs come from ``fused_logprobs`` on the last stage's final hidden states and the
output layer's vocabulary shard, all-reduced over the tensor-parallel group: no
``[s, b, V/tp]`` logits are built. Results (log-probs, loss metrics) are broadcast from
the last pipeline stage, so every rank returns the same values.

Sequences are ``[prompt | response | pad]`` per row (right-padded, positions from 0), so
causal attention alone keeps padding out of every real token's context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_guide.backends.base import Context, LossFn, RolloutBatch
from nemo_guide.backends.megatron._mcore import GPTModel, get_forward_backward_func, parallel_state
from nemo_guide.backends.megatron.model import MegatronModelConfig, hidden_states, load_hf_model, output_weight
from nemo_guide.config import BackendConfig
from nemo_guide.kernels.logprobs import fused_logprobs
from nemo_guide.tracking import reduce_metrics

# -- packing (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """One micro-batch laid out for the model.

    ``tokens`` rows are ``[prompt | response | pad]``; the hidden state at
    ``(rows[j], cols[j])`` predicts response token ``targets[j]``, which sits at response
    position ``steps[j]`` of row ``rows[j]``.
    """

    tokens: torch.Tensor
    """Shape: ``[b, s]``, long (``b`` may exceed the real rows: padding rows have no targets)."""
    rows: torch.Tensor
    """Shape: ``[T]``, long."""
    cols: torch.Tensor
    """Shape: ``[T]``, long."""
    steps: torch.Tensor
    """Shape: ``[T]``, long."""
    targets: torch.Tensor
    """Shape: ``[T]``, long."""


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, *, rows: int, seq_len: int) -> Packed:
    """Lay out ``len(prompts)`` rollouts in a ``[rows, seq_len]`` token block (see :class:`Packed`)."""
    if len(prompts) != len(responses) or len(prompts) > rows:
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses do not fit {rows} rows")
    tokens = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    r, c, t, y = [], [], [], []
    for i, (p, o) in enumerate(zip(prompts, responses, strict=True)):
        if not p:
            raise ValueError(f"rollout {i} has an empty prompt; every response needs a context token before it")
        if len(p) + len(o) > seq_len:
            raise ValueError(f"rollout {i}: prompt {len(p)} + response {len(o)} tokens exceed seq_len {seq_len}")
        tokens[i, : len(p)] = torch.tensor(p)
        tokens[i, len(p) : len(p) + len(o)] = torch.tensor(o, dtype=torch.long)
        r += [i] * len(o)
        c += range(len(p) - 1, len(p) - 1 + len(o))
        t += range(len(o))
        y += o
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return Packed(tokens, as_long(r), as_long(c), as_long(t), as_long(y))


def padded_length(lengths: list[int], multiple: int) -> int:
    """The smallest multiple of ``multiple`` that holds the longest sequence."""
    longest = max(lengths, default=1)
    return -(-longest // multiple) * multiple


# -- the actor ----------------------------------------------------------------------------


class MegatronActor:
    """Log-probs and policy-loss gradients of this rank's ``GPTModel`` stage."""

    def __init__(self, model: GPTModel, *, pad_id: int, temperature: float = 1.0, logprob_chunk_size: int = 1024, seq_len_multiple: int = 8) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.pad_id = pad_id
        self.temperature = temperature
        self.logprob_chunk_size = logprob_chunk_size
        self.seq_len_multiple = seq_len_multiple
        self.device = next(model.parameters()).device

    # -- one micro-batch on this stage --------------------------------------------------

    def _stage_forward(self, packed: Packed, n: int, width: int, with_entropy: bool):
        """Hidden states on inner stages; ``(logprobs [n, L], entropy [n, L] | None)`` on the last."""
        tokens = packed.tokens.to(self.device)
        hidden = hidden_states(self.model, tokens)  # [s, b, H]
        if not self.model.post_process:
            return hidden
        picked = hidden[packed.cols.to(self.device), packed.rows.to(self.device)]  # [T, H]
        result = fused_logprobs(
            picked / self.temperature,
            output_weight(self.model),
            packed.targets.to(self.device),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            chunk_size=self.logprob_chunk_size,
            return_entropy=with_entropy,
        )
        lp, ent = result if with_entropy else (result, None)
        index = (packed.rows.to(self.device), packed.steps.to(self.device))
        dense = lambda v: torch.zeros(n, width, dtype=v.dtype, device=self.device).index_put(index, v)  # noqa: E731
        return dense(lp), (dense(ent) if ent is not None else None)

    def _micro_batches(self, batch: RolloutBatch, context: Context, micro_batch_size: int):
        prompts = batch.prompts(context)
        seq_len = padded_length([len(p) + len(o) for p, o in zip(prompts, batch.response_ids, strict=True)], self.seq_len_multiple)
        out = []
        for start in range(0, len(batch), micro_batch_size):
            idx = list(range(start, min(len(batch), start + micro_batch_size)))
            packed = pack([prompts[i] for i in idx], [batch.response_ids[i] for i in idx], self.pad_id, rows=micro_batch_size, seq_len=seq_len)
            out.append((batch.select(idx), packed))
        return out, seq_len

    def _run(self, micro, seq_len: int, micro_batch_size: int, width: int, with_entropy: bool, loss_of, forward_only: bool):
        """Megatron's schedule over ``micro``; returns the last stage's per-micro-batch dicts."""
        queue = iter(micro)

        def forward_step(data_iterator, model):
            mb, packed = next(data_iterator)
            out = self._stage_forward(packed, len(mb), width, with_entropy)
            if not self.model.post_process:
                return out, None
            logprobs, entropy = out
            return logprobs, lambda lp: loss_of(mb, lp, entropy)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=queue,
            model=[self.model],
            num_microbatches=len(micro),
            seq_length=seq_len,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    def _from_last_stage(self, value):
        """``value`` of the last pipeline stage on every rank of this rank's pipeline."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=parallel_state.get_pipeline_model_parallel_group())
        return box[0]

    # -- public ------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, context: Context, *, micro_batch_size: int = 8, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Response log-probs behind ``context``. Shape: ``[N, L]`` (and entropy), on CPU, every rank."""
        if len(batch) == 0:
            empty = torch.zeros(0, batch.response_length)
            return empty, (empty.clone() if with_entropy else None)
        self.model.eval()
        micro, seq_len = self._micro_batches(batch, context, micro_batch_size)

        def keep(mb, lp, ent):
            return lp.sum() * 0.0, torch.tensor(1), {"logprobs": lp.float().cpu(), "entropy": None if ent is None else ent.float().cpu()}

        stored = self._run(micro, seq_len, micro_batch_size, batch.response_length, with_entropy, keep, forward_only=True)
        result = None
        if self.model.post_process:
            lp = torch.cat([s["logprobs"] for s in stored])
            ent = torch.cat([s["entropy"] for s in stored]) if with_entropy else None
            result = (lp, ent)
        return self._from_last_stage(result)

    def forward_backward(self, batch: RolloutBatch, loss_fn: LossFn, *, micro_batch_size: int, with_entropy: bool = False) -> dict[str, float]:
        """Accumulate ``loss_fn``'s gradients over ``batch`` (scored behind the plain prompt).

        ``loss_fn(micro, logprobs [n, L], entropy [n, L] | None, batch)`` is the same callback
        the embedded backend takes; it must carry each micro-batch's share of the mini-batch.
        With tied embeddings split over pipeline stages, the embedding's and the output
        copy's gradients are summed over the embedding group, as Megatron's
        ``finalize_model_grads`` does. Returns the reduced metrics on every rank.

        Gradients are this rank's, for its data-parallel share of the batch: averaging
        them over data-parallel ranks and the optimizer step belong to the trainer's
        optimizer wrapper, not to the actor.
        """
        self.model.train()
        micro, seq_len = self._micro_batches(batch, "plain", micro_batch_size)

        def loss_of(mb, lp, ent):
            loss, metrics = loss_fn(mb.to_device(self.device), lp, ent, batch)
            return loss, torch.tensor(1), {k: v.detach().float().cpu() for k, v in metrics.items()}

        stored = self._run(micro, seq_len, micro_batch_size, batch.response_length, with_entropy, loss_of, forward_only=False)
        self._sum_tied_embedding_grads()
        metrics = reduce_metrics(stored) if self.model.post_process else None
        return self._from_last_stage(metrics)

    def _sum_tied_embedding_grads(self) -> None:
        if not self.model.share_embeddings_and_output_weights or parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return
        if not parallel_state.is_rank_in_embedding_group():
            return
        weight = self.model.shared_embedding_or_output_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def actor_from_config(cfg: BackendConfig, *, pad_id: int, temperature: float = 1.0, layer_spec: str = "auto") -> MegatronActor:
    """This rank's actor for ``backend.model`` (a Hugging Face directory) in ``backend.dtype``,
    after :func:`~nemo_guide.backends.megatron.model.initialize_parallel`."""
    if cfg.model.startswith("builtin:"):
        raise ValueError(f"backend.model = {cfg.model!r}: the Megatron backend loads Hugging Face Qwen2/Llama directories")
    model, _ = load_hf_model(cfg.model, MegatronModelConfig(dtype=cfg.dtype, layer_spec=layer_spec))
    return MegatronActor(model, pad_id=pad_id, temperature=temperature, logprob_chunk_size=cfg.logprob_chunk_size)
