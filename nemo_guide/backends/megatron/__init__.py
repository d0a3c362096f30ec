"""The scale-out path: pieces a Megatron-core host (the NeMo-Aligner actor) composes.

The only package area that imports Megatron-core (through ``_mcore``, one guarded
place). The host runs Megatron's pipeline schedule itself; these modules supply what
goes inside its forward step and around its batches:

- ``layout`` (pure torch): rollouts as ``[prompt | response | pad]`` rows, which hidden
  state predicts which response token, and ``realign``: per-token values between
  Aligner's ``[b, s-1]`` log-prob columns behind either prompt and the response-aligned
  ``[N, L]`` layout of the core loss (DESIGN section 3);
- ``last_stage`` (no Megatron import): response log-probs and entropies from the last
  stage's final hidden states and the output layer's vocabulary shard via
  ``fused_logprobs`` over the TP group, so ``[s, b, V/tp]`` logits are never built;
- ``model``: a Megatron-core ``GPTModel`` for Qwen2/Llama from a Hugging Face config,
  weights sharded for this rank, the stage forward without the output layer
  (``hidden_states``) and the output layer's shard (``output_weight``);
- ``checkpoint``: Megatron-core distributed checkpoints <-> Hugging Face directories
  (``nemo-guide convert``);
- ``nemo_checkpoint``: NeMo 2.1 ``.nemo`` files <-> Hugging Face directories, without NeMo.

Importing this package is cheap; ``model``, ``checkpoint`` and ``nemo_checkpoint`` need
``pip install -e '.[megatron]'``.
"""
