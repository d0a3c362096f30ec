"""``MegatronGPTGuideActorModel``: NeMo-Aligner's PPO actor with the Guide-GRPO loss.

The actor keeps everything Aligner's ``MegatronGPTActorModel`` does (NeMo checkpoints,
Megatron generation or a TensorRT-LLM engine behind ``infer``, the optimizer and gradient
reductions, weight offloading) and replaces its two loss entry points
(``get_actor_forward_output_and_loss_func`` and ``get_loss_and_metrics``, Aligner 0.7.0
``megatron_gpt_ppo_actor.py:104-228``):

- **Log-probs from hidden states.** The output layer is bypassed for one forward
  (:func:`final_hidden_states`), and :func:`nemo_guide.backends.megatron.last_stage.response_logprobs`
  runs ``fused_logprobs`` on the response positions' final hidden states and this rank's
  vocabulary shard over the tensor-parallel group, so ``[s, b, V/tp]`` float32 logits are
  never held for a micro-batch.
- **The loss is a callback** (``nemo_guide.backends.base.LossFn``): the Guide-GRPO surrogate
  of :func:`nemo_guide.steps.policy_loss_fn` (``nemo_guide.core.guide_policy_loss`` with every
  option of the embedded loop) or the SFT loss. Each micro-batch carries its share of the
  *global* mini-batch's :class:`~nemo_guide.backends.base.Totals`, and is multiplied back by
  the number of micro-batches and the data-parallel size (Megatron's schedule divides by
  the first, NeMo's gradient all-reduce averages over the second), so the gradient is the
  global token mean (or the chosen aggregation) whatever the layout.
- **TensorRT-LLM** (``model.ppo.trt_llm.enable``): the engine wrapper is
  :class:`nemo_guide.aligner.trt_engine.GuideTRTLLMGenerate` instead of Aligner's, so Qwen2's
  QKV bias reaches the engine at build and at every refit.
- **Batches are** :class:`~nemo_guide.backends.base.RolloutBatch` **objects**, on every rank
  of the pipeline, so the keys the loss needs (guided flags, old log-probs, advantages,
  loss mask, reference log-probs) reach the last stage without a required-keys list.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from nemo_aligner.models.nlp.gpt.megatron_gpt_ppo_actor import MegatronGPTActorModel
from nemo_aligner.utils.distributed import broadcast_2d_tensor_within_pp
from nemo_aligner.utils.train_utils import set_sync_funcs
from nemo_aligner.utils.utils import configure_batch_sizes

from nemo_guide.backends.base import TRAIN_ENTROPY, Context, LossFn, RolloutBatch, Totals
from nemo_guide.backends.megatron.last_stage import response_logprobs
from nemo_guide.backends.megatron.layout import lay_out
from nemo_guide.tracking import reduce_metrics


@dataclass(frozen=True)
class GuideTrainBatch:
    """What :meth:`MegatronGPTGuideActorModel.get_loss_and_metrics` trains on."""

    rollouts: RolloutBatch
    """This rank's rollouts, with ``old_logprobs`` and ``advantages`` (and ``ref_logprobs`` with KL)."""
    loss_fn: LossFn
    totals: Totals
    """The totals of the whole mini-batch, every data-parallel rank's share together."""
    micro_batch_size: int
    with_entropy: bool = False


def unwrap_gpt(module: torch.nn.Module) -> torch.nn.Module:
    """The megatron-core ``GPTModel`` inside NeMo's wrappers (Float16Module, DDP)."""
    while not isinstance(getattr(module, "output_layer", None), torch.nn.Module) and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module


@contextmanager
def final_hidden_states(gpt: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """For one forward of ``gpt`` (last stage), its output layer returns the final hidden
    states instead of logits; yields a dict that receives ``weight``, the ``[V/tp, H]`` shard
    the output layer would have used (the shared embedding when tied)."""
    captured: dict[str, torch.Tensor] = {}
    layer = gpt.output_layer

    def passthrough(input_, weight=None, runtime_gather_output=None):
        captured["weight"] = layer.weight if weight is None else weight
        return input_, None

    layer.forward = passthrough
    try:
        yield captured
    finally:
        del layer.forward


class MegatronGPTGuideActorModel(MegatronGPTActorModel):
    """Aligner's PPO actor trained with a :data:`~nemo_guide.backends.base.LossFn`.

    Config keys read besides the PPO actor's: ``guide_logprob_chunk_size`` (tokens per
    ``fused_logprobs`` chunk, default 1024) and ``guide_temperature`` (the sampling
    temperature that log-probs are computed at, default ``ppo.sampling_params.temperature``).
    """

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.guide_chunk_size = int(cfg.get("guide_logprob_chunk_size", 1024))
        self.guide_temperature = float(cfg.get("guide_temperature", cfg.ppo.sampling_params.temperature) or 1.0)
        if self.use_trtllm_generation:  # the engine wrapper with the faithful (Qwen2 QKV-bias) export
            from nemo_guide.aligner.trt_engine import engine_from_config

            self.trtllm_generate = engine_from_config(self.cfg, self.tokenizer)

    # -- one forward step, for scoring and for training -------------------------------------

    def _forward_step(self, width: int, with_entropy: bool, loss_fn: LossFn | None, totals: Totals | None):
        """A Megatron forward-step function over items ``{"rows", "micro"}`` (see :meth:`_items`).

        Forward only (``loss_fn`` None): the non-loss data are ``(logprobs, entropy)`` ``[b, L]``.
        Training: the loss is ``loss_fn``'s, rescaled for Megatron's and NeMo's averaging.
        """
        tp_group = parallel_state.get_tensor_model_parallel_group() if parallel_state.get_tensor_model_parallel_world_size() > 1 else None
        sequence_parallel = bool(self.cfg.get("sequence_parallel", False))

        def step(data_iterator, model):
            item = next(data_iterator)
            rows = item["rows"]
            tokens = rows.tokens.to(torch.cuda.current_device())
            attention_mask, _, position_ids = self.get_ltor_masks_and_position_ids(tokens)
            gpt = unwrap_gpt(model)
            if gpt.post_process:
                with final_hidden_states(gpt) as captured:
                    output = model(tokens, position_ids, attention_mask, labels=None)
            else:
                output, captured = model(tokens, position_ids, attention_mask, labels=None), {}

            def score(output: torch.Tensor):
                hidden = output.transpose(0, 1)  # [b, s(/tp), H] -> [s(/tp), b, H]
                if sequence_parallel:
                    hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
                return response_logprobs(
                    hidden, captured["weight"], tokens, rows.prompt_lengths, rows.response_lengths, width=width,
                    tp_group=tp_group, temperature=self.guide_temperature, chunk_size=self.guide_chunk_size, return_entropy=with_entropy,
                )

            def loss_func(output: torch.Tensor, non_loss_data: bool = False):
                logprobs, entropy = score(output)
                n = len(item["micro"])
                if loss_fn is None:
                    return logprobs[:n], (entropy[:n] if entropy is not None else None)
                micro = item["micro"].to_device(logprobs.device).with_current_as_old(logprobs[:n])
                loss, metrics = loss_fn(micro, logprobs[:n], entropy[:n] if entropy is not None else None, totals)
                scale = get_num_microbatches() * parallel_state.get_data_parallel_world_size()
                metrics = {k: v.detach().float() for k, v in metrics.items()}
                if entropy is not None:  # per token, for pi_old's entropy of an on-policy update
                    metrics[TRAIN_ENTROPY] = entropy[:n].detach().float()
                return loss * scale, metrics

            return output, loss_func

        return step

    def _items(self, batch: RolloutBatch, context: Context, micro_batch_size: int, seq_len: int) -> list[dict]:
        """Micro-batches of ``batch`` laid out behind ``context``'s prompts, all ``[micro_batch_size, seq_len]``
        (pipeline stages exchange fixed shapes); padding rows have no response tokens."""
        pad = self.tokenizer.eos_id
        items = []
        for start in range(0, len(batch), micro_batch_size):
            micro = batch.select(range(start, min(len(batch), start + micro_batch_size)))
            rows = lay_out(micro.prompts(context), micro.response_ids, pad, rows=micro_batch_size, seq_len=seq_len)
            items.append({"rows": rows, "micro": micro})
        return items

    @staticmethod
    def _seq_len(batch: RolloutBatch) -> int:
        longest = max(len(p) + len(o) for p, o in zip(batch.plain_prompt_ids + batch.sample_prompt_ids, batch.response_ids * 2, strict=True))
        return longest + (-longest) % 8  # a multiple of 8 bounds the number of distinct shapes

    # -- scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def guide_logprobs(self, batch: RolloutBatch, context: Context, *, with_entropy: bool = False, micro_batch_size: int | None = None):
        """log pi(response | ``context``'s prompt) of this rank's ``batch``, response-aligned.

        Returns:
            ``(logprobs [N, L], entropy [N, L] | None)`` on the CPU, on every pipeline stage.
        """
        n, width = len(batch), batch.response_length
        if n == 0:
            return torch.zeros(0, width), (torch.zeros(0, width) if with_entropy else None)
        mbs = micro_batch_size or self.forward_micro_batch_size
        seq_len = self._seq_len(batch)
        items = self._items(batch, context, mbs, seq_len)
        set_sync_funcs(self, forward_only=True)
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step(width, with_entropy, None, None),
            data_iterator=self._make_data_iterator_list(iter(items)),
            model=self.model,
            num_microbatches=len(items),
            forward_only=True,
            seq_length=seq_len,
            micro_batch_size=mbs,
            collect_non_loss_data=True,
        )
        last = parallel_state.is_pipeline_last_stage()
        logprobs = torch.cat([lp for lp, _ in outputs]).float() if last else None
        logprobs = broadcast_2d_tensor_within_pp(logprobs, dtype=torch.float32)
        entropy = None
        if with_entropy:
            entropy = torch.cat([e for _, e in outputs]).float() if last else None
            entropy = broadcast_2d_tensor_within_pp(entropy, dtype=torch.float32)
        return logprobs.cpu(), (entropy.cpu() if entropy is not None else None)

    # -- training ----------------------------------------------------------------------------

    def get_actor_forward_output_and_loss_func(self):
        raise TypeError("MegatronGPTGuideActorModel trains through get_loss_and_metrics(GuideTrainBatch); Aligner's PPO batches do not apply")

    def get_loss_and_metrics(self, batch: GuideTrainBatch, forward_only: bool):
        """Forward (and backward unless ``forward_only``) of one mini-batch share; returns
        ``(loss, metrics)`` with the metrics reduced over micro-batches and data-parallel ranks.

        The loss is the whole mini-batch's (every rank's share summed), as the embedded backend
        reports it; metrics are means over micro-batches (``*_min``/``*_max`` reduce by min/max).
        With ``batch.with_entropy`` the metrics also hold this share's per-token entropy under
        :data:`~nemo_guide.backends.base.TRAIN_ENTROPY` (``[n, L]`` on the CPU, every pipeline stage).
        """
        rollouts = batch.rollouts
        mbs = batch.micro_batch_size
        seq_len = self._seq_len(rollouts)
        items = self._items(rollouts, "plain", mbs, seq_len)
        dp = parallel_state.get_data_parallel_world_size()
        configure_batch_sizes(mbs=mbs, gbs=mbs * len(items) * dp, dp=dp)
        set_sync_funcs(self, forward_only)
        parts = get_forward_backward_func()(
            forward_step_func=self._forward_step(rollouts.response_length, batch.with_entropy, batch.loss_fn, batch.totals),
            data_iterator=self._make_data_iterator_list(iter(items)),
            model=self.model,
            num_microbatches=len(items),
            forward_only=forward_only,
            seq_length=seq_len,
            micro_batch_size=mbs,
        )
        last = parallel_state.is_pipeline_last_stage()
        entropies = [p.pop(TRAIN_ENTROPY) for p in parts if TRAIN_ENTROPY in p] if last else []
        reporting = last and parallel_state.get_tensor_model_parallel_rank() == 0
        loss, metrics = _reduce_over_ranks(parts if reporting else [])
        if batch.with_entropy:
            entropy = torch.cat(entropies).to(torch.cuda.current_device()) if last else None
            metrics[TRAIN_ENTROPY] = broadcast_2d_tensor_within_pp(entropy, dtype=torch.float32).cpu()
        return loss, metrics


def _reduce_over_ranks(parts: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
    """Per-micro-batch metrics (of one rank per data-parallel replica) -> one dict on every rank:
    means over all micro-batches of all replicas (``*_min``/``*_max`` by min/max), as the
    embedded backend reduces its micro-batches."""
    gathered: list[list[dict[str, float]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, [{k: float(v) for k, v in p.items()} for p in parts])
    metrics = reduce_metrics([p for rank_parts in gathered for p in rank_parts])
    return metrics.get("loss/total", float("nan")), metrics
