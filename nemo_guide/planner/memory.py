"""Per-GPU memory of a Guide-GRPO run on NeMo-Aligner: the formulas, one function per term.

Pure arithmetic on plain numbers (no torch, no NeMo). Every function returns bytes for the
*heaviest* GPU (the pipeline stage that holds the most), and names its source:

- parameters: counted from the model's shape, the way megatron-core 0.10 lays a GPT model
  out (``GPTModel``: embedding on the first stage, output layer on the last, untied unless
  ``share_embeddings_and_output_weights``; column/row-parallel linears split over TP,
  norms replicated). Checked against the model cards' parameter counts (README).
- weights, gradients, optimizer state: bytes per parameter from the dtypes NeMo 2.1 picks
  (``megatron_base_model.setup_optimization``: Apex ``DistributedFusedAdam`` with fp32 state,
  fp32 gradient buffer (``grad_sync_dtype`` defaults to the state dtype) and, for bf16 O2, the
  16-bit ``param_remainders`` instead of fp32 master weights); the arithmetic is the ZeRO
  paper's (Rajbhandari et al. 2020, Sec. 3.1: 2 + 2 + 12 bytes for mixed-precision Adam) and
  megatron-core's distributed-optimizer table (``6 + 12/d`` for bf16 parameters with fp32
  gradients). Sharded state divides by the data-parallel size ``d``.
- activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Sec. 4 (``sbh(34 + 5as/h)`` per layer, ``/t`` with sequence parallelism, the
  ``5as^2b`` attention-score part removed by selective recompute or flash attention), written
  out per stored tensor so that it also covers SwiGLU, grouped-query attention and no dropout;
  with the 1F1B schedule the first stage holds ``min(p, m)`` micro-batches (Sec. 4.2.3).
- log-prob peak: counted from the code that runs: this project's chunked ``fused_logprobs``
  (``nemo_guide/kernels/logprobs.py``: fp32 copies of the ``[V/t, H]`` output shard and its
  gradient, one ``[C, V/t]`` fp32 chunk and, with the entropy, a row block) and, for comparison, Aligner's ``DistributedLogprob``
  on full ``[b, s, V/t]`` logits (bf16 logits, the fp32 copy Megatron's ``Float16Module`` makes,
  the shifted/softmax fp32 tensor saved for backward, the fp32 log).
- TensorRT-LLM engine: a second copy of the weights (NeMo 2.1 ``TensorRTLLM.build`` with
  ``use_refit``), the paged KV cache of TensorRT-LLM's docs (``2 x layers x kv_heads x
  head_dim x bytes`` per token, for ``max_batch_size x (max_input_len + max_output_len)``
  tokens), and an activation workspace for ``max_batch_size x max_input_len`` context tokens
  (the least certain term: TensorRT reuses buffers; we count the MLP's live set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """A GPT decoder in NeMo's ``model_config.yaml`` terms (the keys are named in ``inputs.py``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    """The padded vocabulary the embedding really has."""
    tied: bool = False
    qkv_bias: bool = False
    linear_bias: bool = False
    gated: bool = True
    """SwiGLU (fc1 produces ``2F``); False for GeLU."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def layer_params(self, tp: int) -> float:
        """Parameters of one transformer layer on one TP rank."""
        h, f, q, kv = self.hidden_size, self.ffn_hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        fc1 = (2 if self.gated else 1) * f
        sharded = h * q + 2 * h * kv + q * h + h * fc1 + f * h
        if self.qkv_bias or self.linear_bias:
            sharded += q + 2 * kv
        if self.linear_bias:
            sharded += fc1
        replicated = 2 * h + (2 * h if self.linear_bias else 0)  # two norms (+ the row-parallel biases)
        return sharded / tp + replicated

    def total_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied else 2)
        return round(self.num_layers * self.layer_params(1) + embeddings + self.hidden_size)


def stage_params(shape: Shape, tp: int, pp: int) -> float:
    """Parameters on one GPU of the heaviest pipeline stage (first or last).

    The first stage holds the embedding, the last the final norm and the output layer (a copy
    of the embedding when tied and ``pp > 1``, as megatron-core keeps it for the tied gradient)."""
    layers = math.ceil(shape.num_layers / pp) * shape.layer_params(tp)
    emb = shape.vocab_size * shape.hidden_size / tp
    if pp == 1:
        return layers + emb * (1 if shape.tied else 2) + shape.hidden_size
    return layers + emb + shape.hidden_size  # first: embedding; last: output layer (or its tied copy) + norm


@dataclass(frozen=True)
class Precision:
    param_bytes: int
    """2 for bf16/fp16 weights (``megatron_amp_O2``), 4 for fp32 weights under autocast."""
    grad_bytes: int
    """Bytes per gradient in the buffer the optimizer reads."""
    state_bytes: float
    """Optimizer bytes per parameter before sharding (Adam moments + master copy)."""
    sharded: bool
    """Whether the optimizer state is split over the data-parallel ranks."""


def precision(optimizer: str, *, half_params: bool, fp16: bool = False, store_params: bool | None = None, half_grads: bool = False) -> Precision:
    """Bytes per parameter for NeMo 2.1's optimizers.

    ``distributed_fused_adam`` (Apex): fp32 moments (8); master weights as 16-bit remainders
    (2) for bf16 O2 unless ``store_params`` (4), none with fp32 weights; fp32 gradient buffer.
    ``mcore_distributed_optim``: megatron-core's table, fp32 main weights and moments (12 with
    half weights, 8 with fp32), fp32 gradients. Anything else (``fused_adam``, ``adam``):
    replicated; with O2 NeMo's ``MainParamsOptimizerWrapper`` keeps fp32 master weights and fp32
    gradients for bf16 (18 bytes in all) or fp16 gradients for fp16 (ZeRO's 16 bytes).
    ``half_grads``: Apex's ``grad_sync_dtype`` set to bf16/fp16 (``model.optim.grad_sync_dtype``)."""
    p = 2 if half_params else 4
    if optimizer == "distributed_fused_adam":
        master = 0 if not half_params else (4 if store_params or fp16 else 2)
        return Precision(p, 2 if half_grads else 4, 8 + master, True)
    if optimizer == "mcore_distributed_optim":
        return Precision(p, 4, 8 + (4 if half_params else 0), True)
    if half_params:
        return Precision(p, 2 if fp16 else 4, 12, False)
    return Precision(p, 4, 8, False)


def model_state_bytes(params: float, prec: Precision, dp: int) -> dict[str, float]:
    """``{"weights", "gradients", "optimizer"}`` bytes for ``params`` parameters on one GPU."""
    return {
        "weights": params * prec.param_bytes,
        "gradients": params * prec.grad_bytes,
        "optimizer": params * prec.state_bytes / (dp if prec.sharded else 1),
    }


@dataclass(frozen=True)
class Activations:
    micro_batch: int
    seq_len: int
    tp: int = 1
    sequence_parallel: bool = False
    flash: bool = True
    """Flash/fused attention (TransformerEngine): no ``[b, a, s, s]`` scores are stored."""
    recompute: str | None = None
    """None, ``selective`` (core attention) or ``full``."""
    recompute_method: str = "uniform"
    recompute_layers: int = 1
    act_bytes: int = 2


def layer_activation_bytes(shape: Shape, a: Activations) -> float:
    """Bytes one transformer layer keeps for backward for one micro-batch (Korthikanti Sec. 4.1).

    Per token, in elements: the two norm inputs and their outputs (the QKV and fc1 inputs), the
    dropout masks (1 byte each) when dropout is on, then over TP: q, k, v, the attention output
    (the projection's input), fc1's output (the activation's input: ``2F`` gated) and the
    activation's output (fc2's input). Without flash attention the softmax output ``a s^2 b``
    (plus its dropout mask and output when attention dropout is on) is stored too. For GPT
    (``F = 4h``, GeLU, dropout) this is exactly ``sbh(34 + 5as/h)``."""
    s, b, t, eb = a.seq_len, a.micro_batch, a.tp, a.act_bytes
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    masks = 2 * h if shape.hidden_dropout > 0 else 0  # bytes per token, two hidden-dropout masks
    norm_side = eb * 4 * h + masks
    sharded = eb * (q + 2 * kv + q + (2 if shape.gated else 1) * f + f)
    per_token = norm_side / (t if a.sequence_parallel else 1) + sharded / t
    scores = 0.0
    if not a.flash and a.recompute != "selective":
        scores = (eb + (1 + eb if shape.attention_dropout > 0 else 0)) * shape.num_heads * s * s * b / t
    return s * b * per_token + scores


def layer_input_bytes(shape: Shape, a: Activations) -> float:
    """The one tensor full recompute keeps per checkpointed chunk: the layer input ``[s, b, h]``."""
    return a.act_bytes * a.seq_len * a.micro_batch * shape.hidden_size / (a.tp if a.sequence_parallel else 1)


def activation_bytes(shape: Shape, a: Activations, *, pp: int, micro_batches: int) -> float:
    """Activations on the first pipeline stage during training (its peak).

    Full recompute, ``uniform``: one input per chunk of ``recompute_layers`` layers, plus one
    chunk recomputed in backward; ``block``: the first ``recompute_layers`` layers of the stage
    keep only their input, the others everything. 1F1B keeps ``min(pp, micro_batches)``
    micro-batches in flight on the first stage."""
    layers = math.ceil(shape.num_layers / pp)
    per_layer, per_input = layer_activation_bytes(shape, a), layer_input_bytes(shape, a)
    if a.recompute == "full":
        k = max(1, min(a.recompute_layers, layers))
        if a.recompute_method == "block":
            stored = k * per_input + (layers - k) * per_layer
        else:
            stored = math.ceil(layers / k) * per_input
        working = (k if a.recompute_method != "block" else 1) * per_layer  # one chunk recomputed at a time
    else:
        stored, working = layers * per_layer, 0.0
    return stored * max(1, min(pp, micro_batches)) + working


LOGPROB_BLOCK_BYTES = 32 * 2**20
"""``nemo_guide.kernels.chunking.BLOCK_BYTES``: the row block of ``fused_logprobs``'s elementwise work."""


def fused_logprob_bytes(shape: Shape, *, tp: int, chunk: int, response_tokens: int, half_params: bool, with_entropy: bool = False) -> float:
    """Peak of ``fused_logprobs`` in backward on the last stage: fp32 copies of the ``[V/t, H]``
    weight shard (two transient casts and the gradient; one when weights are fp32 already), the
    ``[C, V/t]`` fp32 chunk (kept from the forward when the tokens fit in one chunk, else
    recomputed), with the entropy one row block of it more (``LOGPROB_BLOCK_BYTES``, at least
    2 rows and one more for a merged remainder, at most the chunk), and the ``[T, H]`` hidden
    states (bf16 input, fp32 gradient) of the micro-batch's ``T`` response tokens."""
    shard = shape.vocab_size / tp * shape.hidden_size * 4
    copies = 3 if half_params else 1
    row = shape.vocab_size / tp * 4
    rows = min(chunk, max(response_tokens, 1))
    block = min(rows, max(2, LOGPROB_BLOCK_BYTES // int(row)) + 1) if with_entropy else 0
    return copies * shard + (rows + block) * row + response_tokens * shape.hidden_size * (2 + 4)


def naive_logprob_bytes(shape: Shape, *, tp: int, micro_batch: int, seq_len: int) -> float:
    """Aligner's ``from_parallel_logits_to_logprobs`` on ``[b, s, V/t]`` logits: 2 (bf16 logits)
    + 4 (fp32 copy) + 4 (shifted/softmax, kept for backward) + 4 (its log) bytes per element."""
    return 14.0 * micro_batch * seq_len * shape.vocab_size / tp


@dataclass(frozen=True)
class Engine:
    enabled: bool
    max_batch: int
    max_input_len: int
    max_output_len: int
    reshard: bool = False
    unload_during_training: bool = False
    kv_bytes: int = 2


def kv_cache_bytes(shape: Shape, *, tp: int, layers: int, batch: int, tokens: int, kv_bytes: int = 2) -> float:
    """TensorRT-LLM's KV-cache size: ``2 x layers x kv_heads/tp x head_dim x bytes`` per token."""
    kv_heads = max(1, shape.num_kv_heads // tp)  # TensorRT-LLM replicates KV heads when tp exceeds them
    return 2.0 * layers * kv_heads * shape.head_dim * kv_bytes * batch * tokens


def engine_bytes(shape: Shape, engine: Engine, *, tp: int, pp: int) -> dict[str, float]:
    """``{"engine_weights", "kv_cache", "engine_workspace"}`` on one GPU while rollouts run.

    With TensorRT-LLM the engine holds its own bf16 copy of this GPU's weights (all stages'
    when ``reshard`` turns PP into data parallelism for inference). Without it, Megatron's
    generation reuses the training weights and keeps only its KV cache."""
    pp_engine = 1 if (engine.enabled and engine.reshard) else pp
    layers = math.ceil(shape.num_layers / pp_engine)
    tokens = engine.max_input_len + engine.max_output_len
    kv = kv_cache_bytes(shape, tp=tp, layers=layers, batch=engine.max_batch, tokens=tokens, kv_bytes=engine.kv_bytes)
    if not engine.enabled:
        return {"engine_weights": 0.0, "kv_cache": kv, "engine_workspace": 0.0}
    context_tokens = engine.max_batch * engine.max_input_len
    f = (3 if shape.gated else 2) * shape.ffn_hidden_size / tp
    workspace = 2.0 * context_tokens * (2 * shape.hidden_size + f) + 4.0 * engine.max_batch * shape.vocab_size / tp
    return {"engine_weights": 2.0 * stage_params(shape, tp, pp_engine), "kv_cache": kv, "engine_workspace": workspace}
