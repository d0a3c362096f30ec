"""The Guide actor behind the protocols of ``nemo_guide.backends.base``, data-parallel aware.

:class:`AlignerHost` is what the named steps of :mod:`nemo_guide.steps` (through
:func:`nemo_guide.loop.algorithm_step`, the same function the embedded loop runs) call on a
NeMo-Aligner run. Every rank calls it with the same *global* arguments; inside, each
data-parallel replica does its share and the results are gathered, so every rank holds the
same global batch and the algorithm's decisions (guidance, groups, advantages) are made
once, on all of it:

- ``generate``: each replica samples its contiguous share of the prompts through the actor's
  ``infer`` (TensorRT-LLM when ``ppo.trt_llm.enable``, else Megatron's generation); the
  responses are gathered in prompt order. Engine calls always hold the engine's batch
  (``rollout_micro_batch_size``) rows, padded with an inert prompt whose outputs are dropped.
  ``generate_with_logprobs`` (the engine's per-token log-probs, for
  ``algorithm.rollout_correction``) and ``greedy`` (the TensorRT-LLM probe) go through the
  same path; ``take_perf_metrics`` reports throughput, padding, build and refit times.
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
import time
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from nemo_aligner.utils.train_utils import clip_gradients
from nemo_aligner.utils.utils import cpu_weight_swap, retrieve_model_state_dict_in_cpu

from nemo_guide.aligner.actor import GuideTrainBatch, MegatronGPTGuideActorModel
from nemo_guide.aligner.engine_batch import EngineChunk, engine_chunks, real_outputs
from nemo_guide.aligner.parallel import gather_in_order, share_of
from nemo_guide.backends.base import TRAIN_ENTROPY, Context, LossFn, RolloutBatch, Totals


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
        self._perf = {"rows": 0.0, "padded_rows": 0.0, "tokens": 0.0, "seconds": 0.0}

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

    def _engine_settings(self, temperature: float, top_p: float) -> bool:
        """Whether the engine samples with these settings (TensorRT-LLM's are fixed at build)."""
        params = self.actor.cfg.ppo.sampling_params
        return self.actor.use_trtllm_generation and temperature == float(params.temperature) and top_p == float(params.top_p)

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens: int, temperature: float, top_p: float, seed: int):
        # TensorRT-LLM's sampling settings are fixed when its engine is built: other settings
        # (greedy validation) generate with Megatron instead, from the same weights.
        responses, finished, _ = self._generate(prompts, max_new_tokens, temperature, top_p, seed, engine=self._engine_settings(temperature, top_p))
        return responses, finished

    @torch.no_grad()
    def generate_with_logprobs(self, prompts, *, max_new_tokens: int, temperature: float, top_p: float, seed: int):
        """:meth:`generate` through the engine, with TensorRT-LLM's log-prob of every sampled token."""
        if not self._engine_settings(temperature, top_p):
            raise RuntimeError(
                "per-token sampler log-probs come from the TensorRT-LLM engine only (NeMo-Aligner's Megatron generation returns none): "
                "set model.ppo.trt_llm.enable = true with model.ppo.sampling_params equal to trainer.guide.generation"
            )
        return self._generate(prompts, max_new_tokens, temperature, top_p, seed, engine=True, logprobs=True)

    @torch.no_grad()
    def greedy(self, prompts, *, max_new_tokens: int, engine: bool) -> list[list[int]]:
        """Greedy responses from the engine (``engine=True``, the probe) or from Megatron's generation."""
        return self._generate(prompts, max_new_tokens, 0.0, 1.0, 0, engine=engine, greedy=True)[0]

    def _generate(self, prompts, max_new_tokens: int, temperature: float, top_p: float, seed: int, *, engine: bool, logprobs: bool = False, greedy: bool = False):
        """Each replica generates its contiguous share in calls of ``rollout_micro_batch_size``
        prompts; engine calls are padded to exactly that many rows with an inert prompt whose
        outputs are dropped (:mod:`nemo_guide.aligner.engine_batch`). Gathered in prompt order."""
        self._inference()
        started = time.perf_counter()
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = share_of(len(prompts), dp, rank)
        actor, size = self.actor, self.rollout_micro_batch_size
        actor._length_params.update(max_length=max_new_tokens, min_length=0)
        actor._sampling_params.update(use_greedy=temperature == 0, temperature=temperature or 1.0, top_p=top_p, top_k=0)
        own = [list(prompts[i]) for i in mine]
        chunks = engine_chunks(own, size, [self.pad_id]) if engine else [EngineChunk(own[s : s + size], len(own[s : s + size])) for s in range(0, len(own), size)]
        outputs = []
        for c, chunk in enumerate(chunks):
            lengths = torch.tensor([len(p) for p in chunk.prompts])
            text = torch.full((len(chunk.prompts), int(lengths.max()) + max_new_tokens), self.pad_id, dtype=torch.long)
            for i, p in enumerate(chunk.prompts):
                text[i, : len(p)] = torch.tensor(p)
            # seeded by the chunk's first global prompt: the same on every model-parallel rank, and with
            # rollout_micro_batch_size = 1 the same samples whatever the data-parallel layout
            torch.manual_seed(seed * 1_000_003 + mine[c * size])
            out, lp = self._infer({"text": text, "length": lengths}, engine=engine, greedy=greedy, logprobs=logprobs)
            tokens, ends, is_end = out["response_tokens"].cpu(), out["response_lengths"].cpu(), out["is_end"].cpu()
            outputs.append([(tokens[i, len(p) : int(ends[i])].tolist(), bool(is_end[i]), lp[i, len(p) : int(ends[i])].tolist() if logprobs else None)
                            for i, p in enumerate(chunk.prompts)])
        rows = gather_in_order(real_outputs(chunks, outputs))
        self._perf["rows"] += sum(len(c.prompts) for c in chunks)
        self._perf["padded_rows"] += sum(c.padded for c in chunks)
        self._perf["tokens"] += sum(len(r) for r, _, _ in rows)
        self._perf["seconds"] += time.perf_counter() - started
        return [r for r, _, _ in rows], [f for _, f, _ in rows], ([lp for _, _, lp in rows] if logprobs else None)

    def _infer(self, batch: dict, *, engine: bool, greedy: bool, logprobs: bool) -> tuple[dict, torch.Tensor | None]:
        """The actor's ``infer`` on one chunk, through the engine or through Megatron's generation;
        with the engine, also its per-position log-probs (``[b, S]``, when asked for)."""
        actor = self.actor
        if engine:
            with actor.trtllm_generate.options(greedy=greedy, logprobs=logprobs):
                out = actor.infer(batch)
                return out, (actor.trtllm_generate.last_logprobs.cpu() if logprobs else None)
        if not actor.use_trtllm_generation:
            return actor.infer(batch), None
        actor.use_trtllm_generation = False
        try:
            return actor.infer(batch), None
        finally:
            actor.use_trtllm_generation = True

    def take_perf_metrics(self) -> dict[str, float]:
        """Generation throughput (tokens per second per GPU, refits excluded), padded engine rows
        and the engine's build and refit seconds since the last call; resets the counters.
        Every rank calls it (one all-reduce)."""
        perf, self._perf = self._perf, dict.fromkeys(self._perf, 0.0)
        counts = torch.tensor([perf["rows"], perf["padded_rows"]], dtype=torch.float64).to(torch.cuda.current_device())
        dist.all_reduce(counts)
        out = {}
        if perf["seconds"] > 0:
            out["perf/gen_tokens_per_s_per_gpu"] = perf["tokens"] / perf["seconds"] / dist.get_world_size()
        if counts[0] > 0:
            out["perf/padded_row_frac"] = float(counts[1] / counts[0])
        if self.actor.use_trtllm_generation:
            out.update({f"time/{key}": v for key, v in self.actor.trtllm_generate.pop_timings().items()})
        return out

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
        normalised by the whole mini-batch's totals; with ``with_entropy`` the replicas' per-token
        entropies are gathered into the global one."""
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
        entropy = metrics.pop(TRAIN_ENTROPY, None)
        if entropy is not None:  # [own, L] (one padding row for an empty share) -> [len(batch), L]
            entropy = torch.stack(gather_in_order(list(entropy[: len(index)]))) if len(batch) else torch.zeros(0, batch.response_length)
        self.actor.finish_training_step()
        grad_norm = clip_gradients(self.actor, self.grad_clip if self.grad_clip > 0 else None)
        grad_norm = float(grad_norm) if grad_norm is not None else _grad_norm(self.actor)
        skipped = not math.isfinite(grad_norm) or not math.isfinite(metrics.get("loss/total", 0.0))
        if skipped:
            self.optimizer.zero_grad()
        else:
            self.optimizer.step()
            self.scheduler.step()
        out = {**metrics, "optim/grad_norm": grad_norm, "optim/lr": float(self.optimizer.param_groups[0]["lr"]), "optim/skipped": float(skipped)}
        return out if entropy is None else {**out, TRAIN_ENTROPY: entropy}


def _grad_norm(actor) -> float:
    """The global gradient norm when no clipping computed it (``grad_clip = 0``)."""
    squares = torch.zeros((), dtype=torch.float64)
    for p in actor.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0):
            squares += p.grad.double().pow(2).sum().cpu()
    total = squares.to(torch.cuda.current_device())
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())
