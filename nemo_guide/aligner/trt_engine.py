"""``GuideTRTLLMGenerate``: NeMo-Aligner's TensorRT-LLM wrapper with a faithful export (GPUs only).

NeMo-Aligner 0.7.0's ``GPTGenerateTRTLLM`` (``nemo_aligner/utils/trt_llm.py``) builds and
refits its engine through NeMo 2.1's ``TensorRTLLM.build``/``refit`` (megatron-core's export
helper), which loses Qwen2's QKV bias (:mod:`nemo_guide.aligner.trt_export` says where). This
subclass keeps the wrapper's interface (``refit``, ``generate``, ``free``; its sampling
config, stop words and seeds) and replaces:

- **build**: the engine config is :func:`~nemo_guide.aligner.trt_export.trtllm_config`
  (``attn_bias`` from ``qkv_bias``), the weights :func:`~nemo_guide.aligner.trt_export.engine_weights`
  (q/k/v biases, zero output-projection biases), built with megatron-core's
  ``TRTLLMEngineBuilder`` and loaded the way NeMo loads it (``load_distributed``);
- **refit**: the same weight function, and a strict refit: every weight must exist in the
  engine with its size and every expected engine weight must be provided
  (:func:`~nemo_guide.aligner.trt_export.refit_problems`), where NeMo's refit skips unknown
  names with a log warning;
- **generation**: ``options(greedy=..., logprobs=...)`` switches one call to greedy decoding
  (the probe) and/or asks TensorRT-LLM for each sampled token's log-prob (the probe and
  ``algorithm.rollout_correction``), left in :attr:`last_logprobs` aligned with the returned
  token positions; Aligner's ``generate`` requests none.

It records the seconds spent building and refitting (:meth:`pop_timings`). Everything here
needs TensorRT-LLM 0.13 and a GPU (NeMo-Aligner 0.7.0's image); the pure pieces it calls are
tested on CPU, this module only by ``tests_aligner/test_trt_gpu.py`` (``gpu`` marker).
"""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from typing import Iterator

import tensorrt as trt
import tensorrt_llm
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.export.trtllm.engine_builder.trtllm_engine_builder import TRTLLMEngineBuilder
from nemo.export.trt_llm import tensorrt_llm_run
from nemo.export.trt_llm.converter.model_to_trt_llm_ckpt import torch_dtype_from_precision
from nemo.export.trt_llm.converter.utils import init_model_parallel_from_nemo
from nemo.export.trt_llm.nemo_ckpt_loader.nemo_file import build_tokenizer
from nemo_aligner.utils.distributed import broadcast_2d_tensor_within_mp, broadcast_tensor_within_pp
from nemo_aligner.utils.trt_llm import GPTGenerateTRTLLM

from nemo_guide.aligner.trt_export import ExportError, canonical_names, engine_dtype, engine_weight_shapes, engine_weights, refit_problems, trtllm_config

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def engine_from_config(cfg, tokenizer, cls: type | None = None) -> "GuideTRTLLMGenerate":
    """The wrapper NeMo-Aligner's PPO actor builds from ``cfg`` (its ``__init__``), as a
    :class:`GuideTRTLLMGenerate` (or ``cls``: Aligner's own, to show the stock export's engine)."""
    ppo, trt_cfg = cfg.ppo, cfg.ppo.trt_llm
    return (cls or GuideTRTLLMGenerate)(
        model_cfg=cfg,
        max_generation_length=ppo.length_params.get("max_length", 1024),
        max_input_len=trt_cfg.get("max_input_len", 1024),
        generation_batch_size=ppo.get("rollout_micro_batch_size", 4),
        unload_engine_train=trt_cfg.get("unload_engine_train", False),
        trt_model_type=trt_cfg.get("model_type", "llama"),
        end_strings=ppo.sampling_params["end_strings"],
        reshard_model=trt_cfg.get("reshard", False),
        sample_temperature=ppo.sampling_params["temperature"],
        sample_top_k=ppo.sampling_params["top_k"],
        sample_top_p=ppo.sampling_params["top_p"],
        repetition_penalty=ppo.sampling_params["repetition_penalty"],
        use_greedy=ppo.sampling_params.get("use_greedy", False),
        tokenizer=tokenizer,
        seed=trt_cfg.get("seed", cfg.seed),
        trt_model_dir=ppo.get("trt_model_dir", "/tmp/trt_llm_model"),
    )


def rank_engine_weights(state: dict[str, torch.Tensor], model_cfg, *, vocab_size: int, device, pp_size: int = 1, pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """This rank's engine weights from its Megatron state dict (its engine stage's layers; every
    layer for a PP=1 engine): the vocabulary tensors all-gathered over the TP group first (the
    thin communication step), then :func:`~nemo_guide.aligner.trt_export.engine_weights`."""
    state = canonical_names(state)
    tp_group, tp = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()
    for key in VOCAB_KEYS:
        if key in state and tp > 1:
            parts = [torch.empty_like(state[key]) for _ in range(tp)]
            dist.all_gather(parts, state[key].contiguous(), group=tp_group)
            state[key] = torch.cat(parts)
    weights = engine_weights(state, model_cfg, tp_size=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(), vocab_size=vocab_size,
                             dtype=torch_dtype_from_precision(model_cfg.precision), pp_size=pp_size, pp_rank=pp_rank)
    return {k: v.to(device) for k, v in weights.items()}


class GuideTRTLLMGenerate(GPTGenerateTRTLLM):
    """Aligner's engine wrapper with the Qwen2-faithful export, a strict refit, greedy and log-prob modes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.greedy_config = copy.copy(self.sampling_config)
        self.greedy_config.update(top_k=1, top_p=0.0)
        self._greedy = self._logprobs = False
        self.last_logprobs: torch.Tensor | None = None
        """``[B, S]``: the log-prob of the token at each position of the last call's output (0 on the prompt)."""
        self.timings: dict[str, float] = {}
        self.trt_cfg: dict | None = None
        self.pp_rank = 0

    # -- modes -------------------------------------------------------------------------------

    @contextmanager
    def options(self, *, greedy: bool = False, logprobs: bool = False) -> Iterator[None]:
        """Calls inside decode greedily (``top_k = 1``) and/or return per-token log-probs."""
        self._greedy, self._logprobs = greedy, logprobs
        try:
            yield
        finally:
            self._greedy = self._logprobs = False

    def pop_timings(self) -> dict[str, float]:
        """Seconds spent building (``engine_build``) and refitting (``refit``) since the last call."""
        out, self.timings = self.timings, {}
        return out

    # -- build and refit ---------------------------------------------------------------------

    def refit(self, model) -> None:
        started = time.perf_counter()
        if not self._trtllm_model_compiled:
            self._build(model)
            self._trtllm_model_compiled = True
            key = "engine_build"
        else:
            exporter = self.trt_llm_exporter
            tensorrt_llm_run.load_distributed(exporter.model_dir, exporter.mp_rank, exporter.gpus_per_node)  # after an unload
            self._strict_refit(self._weights(model, device=torch.cuda.current_device()))
            key = "refit"
        torch.cuda.synchronize()
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started

    def _weights(self, model, device) -> dict[str, torch.Tensor]:
        exporter = self.trt_llm_exporter
        state = exporter.gather_and_reshard_model(self.model_cfg, model, torch_dtype_from_precision(self.model_cfg.precision))
        return rank_engine_weights(state, self.model_cfg, vocab_size=exporter.tokenizer.vocab_size, device=device, pp_size=exporter.pp_size, pp_rank=self.pp_rank)

    def _build(self, model) -> None:
        """NeMo's ``TensorRTLLM.build`` (mcore path) with this module's config and weights."""
        exporter = self.trt_llm_exporter
        devices = [None] * dist.get_world_size()
        dist.all_gather_object(devices, torch.cuda.current_device())
        gpus_per_node = max(devices) + 1
        exporter.use_refit, exporter.model_type, exporter.gpus_per_node = True, self.trt_model_type, gpus_per_node
        exporter.mp_rank, exporter.dp_rank, exporter.tp_size, exporter.pp_size, exporter.dp_size = init_model_parallel_from_nemo(self.reshard_model)
        self.pp_rank = 0 if exporter.pp_size == 1 else parallel_state.get_pipeline_model_parallel_rank()  # the engine's stage
        exporter.tokenizer = build_tokenizer(self.tokenizer)
        if exporter.dp_size > 1:
            exporter.model_dir = os.path.join(exporter.model_dir, f"dp_rank{exporter.dp_rank}")
        weights = self._weights(model, device="cpu")
        self.trt_cfg = trtllm_config(self.model_cfg, vocab_size=exporter.tokenizer.vocab_size, tp_size=exporter.tp_size, pp_size=exporter.pp_size,
                                     dtype=engine_dtype(self.model_cfg.precision), gpus_per_node=gpus_per_node)
        config = tensorrt_llm.models.llama.config.LLaMAConfig(**self.trt_cfg)
        config.mapping = tensorrt_llm.Mapping(world_size=exporter.tp_size * exporter.pp_size, rank=exporter.mp_rank, tp_size=exporter.tp_size, pp_size=exporter.pp_size)
        engine = TRTLLMEngineBuilder.build_and_save_engine(
            engine_dir=exporter.model_dir, trtllm_model_weights=weights, trtllm_model_config=config, max_input_len=self.max_input_len,
            max_output_len=self.max_generation_length, max_seq_len=self.max_input_len + self.max_generation_length,
            max_batch_size=self.generation_batch_size, use_refit=True,
        )
        dist.barrier()
        with open(os.path.join(exporter.model_dir, f"config_{dist.get_rank()}.json"), "w", encoding="utf-8") as f:
            json.dump(engine.config.to_dict(), f, indent=4)
        tensorrt_llm_run.load_distributed(exporter.model_dir, exporter.mp_rank, gpus_per_node)
        held = self._held_weights()
        problems = refit_problems({k: v.numel() for k, v in weights.items()}, held, engine_weight_shapes(self.trt_cfg, pp_rank=self.pp_rank))
        if problems:
            raise ExportError("the built TensorRT-LLM engine does not hold the exported weights:\n  " + "\n  ".join(problems))

    def _held_weights(self) -> dict[str, int]:
        engine = tensorrt_llm_run.tensorrt_llm_worker_context.decoder.session.runtime.engine
        refitter = trt.Refitter(engine, trt.Logger(trt.Logger.ERROR))
        return {name: int(refitter.get_weights_prototype(name).size) for name in refitter.get_all_weights()}

    def _strict_refit(self, weights: dict[str, torch.Tensor]) -> None:
        """NeMo's ``tensorrt_llm_run.refit`` without its silent skips."""
        decoder = tensorrt_llm_run.tensorrt_llm_worker_context.decoder
        refitter = trt.Refitter(decoder.session.runtime.engine, trt.Logger(trt.Logger.ERROR))
        problems = refit_problems({k: v.numel() for k, v in weights.items()}, self._held_weights(), engine_weight_shapes(self.trt_cfg, pp_rank=self.pp_rank))
        if problems:
            raise ExportError("refitting the TensorRT-LLM engine would not give the trainer's model:\n  " + "\n  ".join(problems))
        dtype = tensorrt_llm_run.maybe_cast_to_trt_dtype(decoder.session.dtype)
        for name, weight in weights.items():
            location = trt.TensorLocation.DEVICE if weight.is_cuda else trt.TensorLocation.HOST
            refitter.set_named_weights(name, trt.Weights(dtype, weight.data_ptr(), weight.numel()), location)
        if not refitter.refit_cuda_engine():
            raise RuntimeError("TensorRT's refit_cuda_engine failed")

    # -- generation --------------------------------------------------------------------------

    def _generate(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_tokens, prompt_lengths = inputs
        batch_input_ids = [prompt_tokens[i][: prompt_lengths[i]].cpu() for i in range(prompt_tokens.shape[0])]
        config = copy.copy(self.greedy_config if self._greedy else self.sampling_config)
        seeds = torch.randint(0, 2**32, size=(prompt_tokens.shape[0],), dtype=torch.long, generator=self.rng_generator)
        config.update(random_seed=seeds, output_log_probs=self._logprobs)
        out = tensorrt_llm_run.tensorrt_llm_worker_context.decoder.generate(batch_input_ids=batch_input_ids, sampling_config=config, streaming=False)
        output_ids = broadcast_tensor_within_pp(out["output_ids"] if out else None, from_last=False)
        lengths = broadcast_tensor_within_pp(out["sequence_lengths"] if out else None, from_last=False)
        if self._logprobs:  # [B, beam, S]: the log-prob of the token drawn at each position
            logprobs = broadcast_tensor_within_pp(out["log_probs"].float() if out else None, from_last=False)
            self.last_logprobs = logprobs[:, 0].float()
        return torch.squeeze(output_ids, dim=1).long(), torch.squeeze(lengths, dim=1).long()

    def generate(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        self.last_logprobs = None
        out = super().generate(inputs)
        if self._logprobs:
            width = out["response_tokens"].shape[1]
            logprobs = self.last_logprobs[:, :width]
            if logprobs.shape[1] < width:
                logprobs = torch.nn.functional.pad(logprobs, (0, width - logprobs.shape[1]))
            self.last_logprobs = broadcast_2d_tensor_within_mp(logprobs.contiguous(), dtype=torch.float32)
        return out
