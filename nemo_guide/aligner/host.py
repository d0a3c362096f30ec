"""The Guide actor behind the protocols of ``nemo_guide.backends.base``, data-parallel aware.

:class:`AlignerHost` is what the named steps of :mod:`nemo_guide.steps` (through
:func:`nemo_guide.loop.algorithm_step`, the same function the embedded loop runs) call on a
NeMo-Aligner run. Every rank calls it with the same *global* arguments; inside, each
data-parallel replica does its share and the results are gathered, so every rank holds the
same global batch and the algorithm's decisions (guidance, groups, advantages) are made
once, on all of it:

- ``generate``: each replica samples its contiguous share of the prompts through the actor's
  ``infer`` (TensorRT-LLM when ``ppo.trt_llm.enable``, else Megatron's generation); the
  responses are gathered in prompt order.
- ``logprobs``: each replica scores its share (dual context: the prompt each rollout was
  sampled with, or the plain one); the ``[N, L]`` values are gathered.
- ``train_step``: the totals come from the whole (global) mini-batch, then each replica
  trains its share; gradients are averaged by NeMo's all-reduce, which the actor's loss
  scaling accounts for.

The actor switches between inference (eval mode, engine refit once) and training only when
the phase changes, so a step's plain and hinted generations share one refitted engine.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from nemo_aligner.utils.train_utils import clip_gradients
from nemo_aligner.utils.utils import cpu_weight_swap, retrieve_model_state_dict_in_cpu

from nemo_guide.aligner.actor import GuideTrainBatch, MegatronGPTGuideActorModel
from nemo_guide.aligner.parallel import gather_in_order, share_of
from nemo_guide.backends.base import Context, LossFn, RolloutBatch, Totals


class AlignerHost:
    """``PromptTokenizer``, ``Generator`` and the scoring/training members of ``Policy``."""

    def __init__(self, actor: MegatronGPTGuideActorModel, optimizer, scheduler, *, grad_clip: float, rollout_micro_batch_size: int) -> None:
        self.actor, self.optimizer, self.scheduler = actor, optimizer, scheduler
        self.grad_clip = grad_clip
        self.rollout_micro_batch_size = rollout_micro_batch_size
        tok = actor.tokenizer
        self._hf = getattr(tok, "tokenizer", None) if type(tok).__name__ == "AutoTokenizer" else None
        self.eos_ids = (int(tok.eos_id),)
        self.pad_id = int(tok.eos_id)  # Aligner pads with EOS; causal attention keeps it out of every real token
        self.max_length = int(actor.cfg.encoder_seq_length)
        self.chat_tokenizer = self._hf
        self._phase = "idle"

    # -- PromptTokenizer -----------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if self._hf is not None:
            return list(self._hf(text, add_special_tokens=add_special_tokens)["input_ids"])
        ids = list(self.actor.tokenizer.text_to_ids(text))
        bos = getattr(self.actor.tokenizer, "bos_id", None)
        return [bos] + ids if add_special_tokens and bos is not None and bos >= 0 else ids

    def decode(self, ids: Sequence[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=True)
        return self.actor.tokenizer.ids_to_text(list(ids))

    def describe(self) -> str:
        cfg = self.actor.cfg
        params = sum(p.numel() for p in self.actor.parameters())
        return (
            f"NeMo {type(self.actor).__name__}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {params:,} parameters on this rank, "
            f"TP={parallel_state.get_tensor_model_parallel_world_size()} PP={parallel_state.get_pipeline_model_parallel_world_size()} "
            f"DP={parallel_state.get_data_parallel_world_size()}, generation: {'TensorRT-LLM' if self.actor.use_trtllm_generation else 'Megatron'}"
        )

    # -- phases ------------------------------------------------------------------------------

    def _inference(self) -> None:
        if self._phase != "inference":
            if self._phase == "training":
                self.actor.finish_training()
            self.actor.prepare_for_inference()  # refits the TensorRT-LLM engine, once per phase
            self._phase = "inference"

    def _training(self) -> None:
        if self._phase != "training":
            if self._phase == "inference":
                self.actor.finish_inference()
            self.actor.prepare_for_training()
            self._phase = "training"

    # -- Generator ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens: int, temperature: float, top_p: float, seed: int):
        self._inference()
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = share_of(len(prompts), dp, rank)
        actor = self.actor
        engine_params = actor.cfg.ppo.sampling_params
        # TensorRT-LLM's sampling settings are fixed when its engine is built: other settings
        # (greedy validation) generate with Megatron instead, from the same weights.
        use_engine = actor.use_trtllm_generation and temperature == float(engine_params.temperature) and top_p == float(engine_params.top_p)
        actor._length_params.update(max_length=max_new_tokens, min_length=0)
        actor._sampling_params.update(use_greedy=temperature == 0, temperature=temperature or 1.0, top_p=top_p, top_k=0)
        responses: list[list[int]] = []
        finished: list[bool] = []
        eos = self.eos_ids[0]
        own = [list(prompts[i]) for i in mine]
        for start in range(0, len(own), self.rollout_micro_batch_size):
            part = own[start : start + self.rollout_micro_batch_size]
            lengths = torch.tensor([len(p) for p in part])
            width = int(lengths.max()) + max_new_tokens
            text = torch.full((len(part), width), eos, dtype=torch.long)
            for i, p in enumerate(part):
                text[i, : len(p)] = torch.tensor(p)
            # seeded by the chunk's first global prompt: the same on every model-parallel rank, and with
            # rollout_micro_batch_size = 1 the same samples whatever the data-parallel layout
            torch.manual_seed(seed * 1_000_003 + (mine[start] if mine else 0))
            out = self._infer({"text": text, "length": lengths}, use_engine)
            tokens, ends, is_end = out["response_tokens"].cpu(), out["response_lengths"].cpu(), out["is_end"].cpu()
            for i, p in enumerate(part):
                responses.append(tokens[i, len(p) : int(ends[i])].tolist())
                finished.append(bool(is_end[i]))
        pairs = gather_in_order(list(zip(responses, finished, strict=True)))
        return [r for r, _ in pairs], [f for _, f in pairs]

    def _infer(self, batch: dict, use_engine: bool) -> dict:
        if use_engine or not self.actor.use_trtllm_generation:
            return self.actor.infer(batch)
        self.actor.use_trtllm_generation = False
        try:
            return self.actor.infer(batch)
        finally:
            self.actor.use_trtllm_generation = True

    # -- Policy: scoring -------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, context: Context, *, reference: bool = False, with_entropy: bool = False, micro_batch_size: int | None = None):
        self._inference()
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        own = batch.select(torch.tensor(share_of(len(batch), dp, rank), dtype=torch.long))
        swap = nullcontext()
        if reference:
            if self.actor.init_policy_state_dict is None:
                raise RuntimeError("no reference policy: call snapshot_reference() first (algorithm.kl_coef > 0 does)")
            swap = cpu_weight_swap(self.actor, self.actor.init_policy_state_dict, megatron_amp_O2=self.actor.megatron_amp_O2)
        with swap:
            lp, ent = self.actor.guide_logprobs(own, context, with_entropy=with_entropy, micro_batch_size=micro_batch_size)
        lp = torch.cat(gather_in_order(list(lp)) or [torch.zeros(0)]).view(len(batch), batch.response_length) if len(batch) else lp
        if with_entropy:
            ent = torch.cat(gather_in_order(list(ent)) or [torch.zeros(0)]).view(len(batch), batch.response_length) if len(batch) else ent
        return lp, ent

    def snapshot_reference(self) -> None:
        """The current weights, kept on the CPU, as pi_ref for the KL term (Aligner's initial policy)."""
        self.actor.init_policy_state_dict = retrieve_model_state_dict_in_cpu(self.actor, megatron_amp_O2=self.actor.megatron_amp_O2)

    # -- Policy: training ------------------------------------------------------------------

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, *, micro_batch_size: int, with_entropy: bool = False) -> dict[str, float]:
        """One optimizer step on the global mini-batch ``batch``: this replica trains its share,
        normalised by the whole mini-batch's totals."""
        self._training()
        totals = Totals.of(batch)
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        index = share_of(len(batch), dp, rank)
        own = batch.select(torch.tensor(index or [0], dtype=torch.long))
        if not index:  # an empty share still takes part in the gradient all-reduce, with no counted token
            own = own.with_(loss_mask=torch.zeros_like(own.loss_mask))
        self.optimizer.zero_grad()
        self.actor.prepare_for_training_step()
        _, metrics = self.actor.get_loss_and_metrics(GuideTrainBatch(own, loss_fn, totals, micro_batch_size, with_entropy), forward_only=False)
        self.actor.finish_training_step()
        grad_norm = clip_gradients(self.actor, self.grad_clip if self.grad_clip > 0 else None)
        grad_norm = float(grad_norm) if grad_norm is not None else _grad_norm(self.actor)
        skipped = not math.isfinite(grad_norm) or not math.isfinite(metrics.get("loss/total", 0.0))
        if skipped:
            self.optimizer.zero_grad()
        else:
            self.optimizer.step()
            self.scheduler.step()
        return {**metrics, "optim/grad_norm": grad_norm, "optim/lr": float(self.optimizer.param_groups[0]["lr"]), "optim/skipped": float(skipped)}


def _grad_norm(actor) -> float:
    """The global gradient norm when no clipping computed it (``grad_clip = 0``)."""
    squares = torch.zeros((), dtype=torch.float64)
    for p in actor.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0):
            squares += p.grad.double().pow(2).sum().cpu()
    total = squares.to(torch.cuda.current_device())
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())
