"""One Guide-GRPO step's per-GPU memory and token counts, from the terms of :mod:`.memory`.

A step has two memory phases on every GPU (NeMo-Aligner's actor switches between them):

- ``rollout``: weights, gradient buffer, optimizer state (unless ``model.ppo.offload_adam_states``
  moves Apex's distributed Adam state to the CPU while generating) and the generation engine
  (TensorRT-LLM: its weights, KV cache and workspace; Megatron: its KV cache);
- ``training``: weights, gradients, optimizer state, activations, the log-prob peak, and the
  TensorRT-LLM engine unless ``trt_llm.unload_engine_train`` frees it.

Each phase also carries a fixed ``runtime_reserve`` (CUDA context, cuBLAS and NCCL buffers,
allocator fragmentation): an assumption, not a measurement. The plan fits when the larger
phase fits the GPU's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nemo_guide.planner.memory import (
    GIB,
    Activations,
    Engine,
    Precision,
    Shape,
    activation_bytes,
    engine_bytes,
    fused_logprob_bytes,
    model_state_bytes,
    naive_logprob_bytes,
    stage_params,
)

RUNTIME_RESERVE_GIB = 3.0
"""Assumed per-GPU memory outside the model's tensors (not measured in this repository)."""

TRAINING_TERMS = ("weights", "gradients", "optimizer", "activations", "logprobs")
ENGINE_TERMS = ("engine_weights", "kv_cache", "engine_workspace")


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    sequence_parallel: bool = False

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)


@dataclass(frozen=True)
class Workload:
    prompts: int
    """B: prompts per step (global)."""
    group_size: int
    """k: rollouts per prompt."""
    guided: bool
    """Whether hinted re-rolls can double the rollouts (``guide_grpo``)."""
    prompt_tokens: int
    """The longest prompt, hint included (the run's prompt limit)."""
    response_tokens: int
    mini_batch: int | None
    """Rollouts per optimizer step (None: the whole step)."""
    ppo_epochs: int = 1

    @property
    def seq_len(self) -> int:
        """Training row length: prompt + response rounded up to 8, as the actor lays rows out."""
        n = self.prompt_tokens + self.response_tokens
        return n + (-n) % 8


@dataclass(frozen=True)
class PlanInputs:
    shape: Shape
    layout: Layout
    workload: Workload
    precision: Precision
    activations: Activations
    engine: Engine
    logprob_chunk: int = 1024
    with_entropy: bool = False
    offload_optimizer: bool = False
    gpu_memory_gib: float = 80.0
    reserve_gib: float = RUNTIME_RESERVE_GIB


@dataclass
class Plan:
    inputs: PlanInputs
    terms: dict[str, float]
    """Bytes per GPU of each term (``logprobs_naive`` is for comparison and counts nowhere)."""
    phases: dict[str, dict[str, float]]
    """The terms each phase holds at once (bytes)."""
    tokens: dict[str, int]
    problems: list[str] = field(default_factory=list)
    """Shape/layout mismatches (a head count TP does not divide...): such a run cannot start."""

    def phase_total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> float:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak <= self.inputs.gpu_memory_gib * GIB

    @property
    def largest_term(self) -> str:
        held = {k: v for k, v in self.phases[self.peak_phase].items() if k != "runtime_reserve"}
        return max(held, key=held.get)


def _tokens(inp: PlanInputs) -> dict[str, int]:
    w, lay = inp.workload, inp.layout
    plain = w.prompts * w.group_size
    most = plain * (2 if w.guided else 1)
    mini = min(w.mini_batch or most, most)
    rollout_dp = lay.dp * (lay.pp if inp.engine.enabled and inp.engine.reshard else 1)
    per_replica = math.ceil(most / rollout_dp)
    return {
        "prompts_per_step": w.prompts,
        "rollouts_per_step_min": plain,
        "rollouts_per_step_max": most,
        "generated_tokens_per_step_max": most * w.response_tokens,
        "rollout_tokens_per_step_max": most * (w.prompt_tokens + w.response_tokens),
        "train_tokens_per_step_max": most * w.seq_len * w.ppo_epochs,
        "seq_len": w.seq_len,
        "rollouts_per_replica_max": per_replica,
        "engine_calls_per_replica_max": math.ceil(per_replica / max(1, inp.engine.max_batch)),
        "optimizer_steps_per_step_max": w.ppo_epochs * math.ceil(most / mini),
        "micro_batches_per_replica": math.ceil(math.ceil(mini / lay.dp) / inp.activations.micro_batch),
    }


def layout_problems(shape: Shape, lay: Layout) -> list[str]:
    """What megatron-core would refuse for this model and layout, with the sizes involved."""
    out = []
    if lay.world % (lay.tp * lay.pp):
        out.append(f"TP x PP = {lay.tp * lay.pp} does not divide the {lay.world} GPUs ({lay.nodes} nodes x {lay.gpus_per_node})")
    for name, value in (("num_query_groups (KV heads)", shape.num_kv_heads), ("num_attention_heads", shape.num_heads),
                        ("ffn_hidden_size", shape.ffn_hidden_size), ("vocabulary", shape.vocab_size)):
        if value % lay.tp:
            out.append(f"{name} = {value} is not divisible by tensor_model_parallel_size = {lay.tp}")
    if shape.num_layers % lay.pp:
        out.append(f"num_layers = {shape.num_layers} is not divisible by pipeline_model_parallel_size = {lay.pp}")
    if lay.tp > lay.gpus_per_node:
        out.append(f"tensor_model_parallel_size = {lay.tp} spans nodes ({lay.gpus_per_node} GPUs per node): keep TP within NVLink")
    return out


def make_plan(inp: PlanInputs) -> Plan:
    shape, lay, w = inp.shape, inp.layout, inp.workload
    tokens = _tokens(inp)
    params = stage_params(shape, lay.tp, lay.pp)
    terms = model_state_bytes(params, inp.precision, max(1, lay.dp))
    terms["activations"] = activation_bytes(shape, inp.activations, pp=lay.pp, micro_batches=tokens["micro_batches_per_replica"])
    half = inp.precision.param_bytes == 2
    response = inp.activations.micro_batch * w.response_tokens
    terms["logprobs"] = fused_logprob_bytes(shape, tp=lay.tp, chunk=inp.logprob_chunk, response_tokens=response, half_params=half, with_entropy=inp.with_entropy)
    terms["logprobs_naive"] = naive_logprob_bytes(shape, tp=lay.tp, micro_batch=inp.activations.micro_batch, seq_len=w.seq_len)
    terms.update(engine_bytes(shape, inp.engine, tp=lay.tp, pp=lay.pp))
    terms["runtime_reserve"] = inp.reserve_gib * GIB
    rollout_terms = ("weights", "gradients", *(() if inp.offload_optimizer else ("optimizer",)), *ENGINE_TERMS, "runtime_reserve")
    engine_stays = inp.engine.enabled and not inp.engine.unload_during_training
    training_terms = (*TRAINING_TERMS, *(ENGINE_TERMS if engine_stays else ()), "runtime_reserve")
    phases = {
        "rollout": {k: terms[k] for k in rollout_terms if terms[k]},
        "training": {k: terms[k] for k in training_terms if terms[k]},
    }
    return Plan(inp, terms, phases, tokens, layout_problems(shape, lay))
