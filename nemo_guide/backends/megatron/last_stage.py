"""Response log-probs on the last pipeline stage, from final hidden states (no Megatron import).

Megatron's output layer would turn the final hidden states into ``[s, b, V/tp]`` logits
(in float32 for 8 rows of 4096 tokens and Qwen2's 152k vocabulary at TP=2:
8 x 4096 x 76k x 4 bytes, about 10 GB).
:func:`response_logprobs` instead picks the hidden states that predict response tokens and
runs ``fused_logprobs`` on them and this rank's vocabulary shard of the output layer, over
the tensor-parallel group, holding at most ``[chunk_size, V/tp]`` logits at a time. The
result is response-aligned ``[b, L]``, what the core loss takes.

A host calls it inside its pipeline schedule's forward step, on the last stage only; the
hidden states come from ``model.hidden_states`` and the shard from ``model.output_weight``.
"""

from __future__ import annotations

import torch

from nemo_guide.backends.megatron.layout import response_positions
from nemo_guide.kernels.logprobs import fused_logprobs


def response_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    *,
    width: int,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = 1024,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log pi(o_t | prompt, o_<t)`` (and the entropy) of every response token of the rows.

    Args:
        hidden: final hidden states (after the last norm) of the last stage, Megatron's
            sequence-first layout, the whole sequence (gather it first under sequence
            parallelism). Shape: ``[s, b, H]``.
        weight: this rank's contiguous vocabulary shard of the output layer.
            Shape: ``[V/tp, H]`` (``[V, H]`` without ``tp_group``).
        tokens: the ``[prompt | response | pad]`` rows the hidden states were computed on
            (see :mod:`~nemo_guide.backends.megatron.layout`). Shape: ``[b, s]``, long.
        prompt_lengths: Shape: ``[b]``, long.
        response_lengths: generated tokens per row (not Aligner's sequence end).
            Shape: ``[b]``, long.
        width: ``L``, columns of the result (the batch's longest response or more).
        tp_group: the tensor-parallel process group, or None for a whole vocabulary.
        temperature: the sampling temperature; logits are divided by it.
        chunk_size: response tokens per chunk of ``fused_logprobs``; None: chosen from its
            memory budget. With one chunk its logits are kept for the backward.
        return_entropy: also return each token's entropy.

    Returns:
        ``(logprobs, entropy | None)``, each Shape ``[b, L]``, float32, zero outside the
        responses, identical on every TP rank. Differentiable w.r.t. ``hidden`` and
        ``weight``, and attached to ``hidden`` even when no row has a response token, so a
        loss on an all-padding micro-batch still sends (zero) gradients down the pipeline.
    """
    if hidden.dim() != 3 or tokens.dim() != 2 or tuple(hidden.shape[:2]) != (tokens.shape[1], tokens.shape[0]):
        raise ValueError(
            f"hidden must be [s, b, H] for tokens [b, s] = {tuple(tokens.shape)}, got {tuple(hidden.shape)}; "
            "under sequence parallelism gather the sequence before scoring"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = hidden.device
    rows, cols, steps = (t.to(device) for t in response_positions(prompt_lengths, response_lengths, tokens.shape[1] - 1))
    if steps.numel() and int(steps.max()) >= width:
        raise ValueError(f"width = {width} is shorter than the longest response ({int(steps.max()) + 1} tokens)")
    picked = hidden[cols, rows] / temperature  # [T, H]
    targets = tokens.to(device)[rows, cols + 1]  # [T]
    result = fused_logprobs(picked, weight, targets, tp_group=tp_group, chunk_size=chunk_size, return_entropy=return_entropy)
    logprobs, entropy = result if return_entropy else (result, None)
    b = tokens.shape[0]

    def dense(per_token: torch.Tensor) -> torch.Tensor:  # [T] -> [b, L]
        return torch.zeros(b, width, dtype=per_token.dtype, device=device).index_put((rows, steps), per_token)

    return dense(logprobs), (dense(entropy) if entropy is not None else None)
