"""The host side of the Megatron tests: Megatron-core's pipeline schedule driven over the
package's reusable pieces, the way NeMo-Aligner 0.7.0's actor drives it
(``nemo_aligner/models/nlp/gpt/megatron_gpt_ppo_actor.py``: ``get_loss_and_metrics`` for the
update, ``get_inference_log_probs`` for log-probs without gradient).

The package supplies the row layout and realignment (``backends.megatron.layout``), the
stage forward without the output layer (``model.hidden_states``, ``model.output_weight``)
and the last-stage log-probs (``last_stage.response_logprobs``). What a host owns is here:
micro-batching, the schedule, the broadcast from the last stage, and the tied-embedding
gradient sum that NeMo's ``allreduce_first_last_embeddings`` does for Aligner.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_guide.backends.base import Context, LossFn, RolloutBatch, Totals
from nemo_guide.backends.megatron.last_stage import response_logprobs
from nemo_guide.backends.megatron.layout import TokenRows, lay_out, realign
from nemo_guide.tracking import reduce_metrics

PAD_ID = 0
CHUNK = 5  # response tokens per fused_logprobs chunk: several chunks per micro-batch


def _rows(batch: RolloutBatch, context: Context, micro_batch_size: int) -> TokenRows:
    """The batch laid out once behind ``context``, padded to whole micro-batches (as
    Aligner lays out a batch and splits it with ``get_iterator_k_split``); the sequence is
    padded to a multiple of 8, which TransformerEngine's kernels prefer on GPUs."""
    rows = -(-len(batch) // micro_batch_size) * micro_batch_size
    longest = max(len(p) + len(o) for p, o in zip(batch.prompts(context), batch.response_ids, strict=True))
    return lay_out(batch.prompts(context), batch.response_ids, PAD_ID, rows=rows, seq_len=-(-longest // 8) * 8)


def _schedule(model, rows: TokenRows, n: int, micro_batch_size: int, on_last_stage, *, forward_only: bool) -> list:
    """Megatron's schedule (no pipelining at PP=1, 1F1B otherwise) over ``rows`` in
    micro-batches of ``micro_batch_size`` rows; ``n`` rows are rollouts, the rest padding.

    ``on_last_stage(index, micro, hidden [s, b, H]) -> (loss, stored)`` runs on the last
    stage (``index``: the rollouts of the micro-batch); returns the stored values there.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_guide.backends.megatron.model import hidden_states

    device = next(model.parameters()).device
    starts = list(range(0, rows.tokens.shape[0], micro_batch_size))

    def forward_step(data_iterator, _model):
        start = next(data_iterator)
        part = slice(start, start + micro_batch_size)
        micro = TokenRows(rows.tokens[part].to(device), rows.prompt_lengths[part].to(device), rows.response_lengths[part].to(device))
        hidden = hidden_states(model, micro.tokens)  # [s, b, H]
        if not parallel_state.is_pipeline_last_stage():
            return hidden, None
        index = list(range(start, min(n, start + micro_batch_size)))

        def loss_func(output):
            loss, stored = on_last_stage(index, micro, output)
            return loss, torch.tensor(1), stored  # the loss already carries its share: no division

        return hidden, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(starts),
        model=[model],
        num_microbatches=len(starts),
        seq_length=rows.tokens.shape[1],
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def _from_last_stage(value):
    """``value`` of the last pipeline stage on every rank of this rank's pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def _fused(model, micro: TokenRows, hidden, width: int, with_entropy: bool):
    from megatron.core import parallel_state

    from nemo_guide.backends.megatron.model import output_weight

    return response_logprobs(hidden, output_weight(model), micro.tokens, micro.prompt_lengths, micro.response_lengths, width=width,
                             tp_group=parallel_state.get_tensor_model_parallel_group(), chunk_size=CHUNK, return_entropy=with_entropy)


@torch.no_grad()
def logprobs(model, batch: RolloutBatch, context: Context, *, micro_batch_size: int, with_entropy: bool = False):
    """Response log-probs behind ``context`` through ``response_logprobs``. Shape: ``[N, L]``
    (and entropy), on CPU, every rank."""
    model.eval()
    width = batch.response_length

    def keep(index, micro, hidden):
        lp, ent = _fused(model, micro, hidden, width, with_entropy)
        return lp.sum() * 0.0, {"lp": lp[: len(index)].cpu(), "ent": None if ent is None else ent[: len(index)].cpu()}

    stored = _schedule(model, _rows(batch, context, micro_batch_size), len(batch), micro_batch_size, keep, forward_only=True)
    result = None
    if model.post_process:
        result = (torch.cat([s["lp"] for s in stored]), torch.cat([s["ent"] for s in stored]) if with_entropy else None)
    return _from_last_stage(result)


@torch.no_grad()
def aligner_logprobs(model, batch: RolloutBatch, context: Context, *, micro_batch_size: int):
    """Log-probs the way Aligner's ``get_inference_log_probs`` computes them: the output
    layer's ``[s, b, V/tp]`` logits and Megatron's vocab-parallel cross entropy, every
    prediction column. Returns ``(values [b, s-1], rows)`` on CPU, every rank."""
    from megatron.core import tensor_parallel

    from nemo_guide.backends.megatron.model import output_weight

    model.eval()
    rows = _rows(batch, context, micro_batch_size)

    def keep(index, micro, hidden):
        logits = torch.nn.functional.linear(hidden, output_weight(model)).float()  # [s, b, V/tp]
        targets = micro.tokens.roll(-1, dims=1).t().contiguous()  # [s, b]: column j is scored on token j+1
        lp = -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)  # [s, b]
        return lp.sum() * 0.0, {"lp": lp.t()[:, :-1].cpu()}  # [b, s-1]

    stored = _schedule(model, rows, len(batch), micro_batch_size, keep, forward_only=True)
    values = torch.cat([s["lp"] for s in stored]) if model.post_process else None
    return _from_last_stage(values), rows


def sample_logprobs_via_aligner_layout(model, batch: RolloutBatch, *, micro_batch_size: int) -> torch.Tensor:
    """Old log-probs as the Aligner actor gets them: scored in Aligner's ``[b, s-1]`` layout
    behind the sampling prompt, realigned to ``[N, L]``."""
    values, rows = aligner_logprobs(model, batch, "sample", micro_batch_size=micro_batch_size)
    n = len(batch)
    return realign(values[:n], rows.response_lengths[:n], src_prompt_lengths=rows.prompt_lengths[:n], dst_prompt_lengths=None,
                   width=batch.response_length)


def forward_backward(model, batch: RolloutBatch, loss_fn: LossFn, *, micro_batch_size: int, with_entropy: bool = False) -> dict[str, float]:
    """Accumulate ``loss_fn``'s gradients over ``batch`` scored behind the plain prompt;
    the reduced metrics on every rank."""
    model.train()
    device = next(model.parameters()).device

    def loss_of(index, micro, hidden):
        lp, ent = _fused(model, micro, hidden, batch.response_length, with_entropy)
        n = len(index)
        loss, metrics = loss_fn(batch.select(index).to_device(device), lp[:n], None if ent is None else ent[:n], Totals.of(batch))
        return loss, {k: v.detach().float().cpu() for k, v in metrics.items()}

    stored = _schedule(model, _rows(batch, "plain", micro_batch_size), len(batch), micro_batch_size, loss_of, forward_only=False)
    _sum_tied_embedding_grads(model)
    return _from_last_stage(reduce_metrics(stored) if model.post_process else None)


def _sum_tied_embedding_grads(model) -> None:
    """With tied embeddings split over pipeline stages, the embedding's and the output copy's
    gradients are summed over the embedding group (Megatron's ``finalize_model_grads``)."""
    from megatron.core import parallel_state

    if not model.share_embeddings_and_output_weights or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group():
        return
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())
