"""The scale-out path: Megatron-core actors with tensor/pipeline parallelism.

The only package area that imports Megatron-core (through ``_mcore``, one guarded
place). Modules:

- ``model``: a Megatron-core ``GPTModel`` for Qwen2/Llama from a ``ModelShape``,
  weights loaded from a Hugging Face checkpoint and sharded for this rank;
- ``actor``: dual-context response log-probs and policy-loss backward through
  Megatron's pipeline schedules, with ``fused_logprobs`` on the output layer's
  vocabulary shard;
- ``checkpoint``: Megatron-core distributed checkpoints <-> Hugging Face directories.

Importing this package is cheap; the submodules need ``pip install -e '.[megatron]'``.
"""
