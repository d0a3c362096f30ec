"""The NeMo-Aligner host: Guide-GRPO as a NeMo-Aligner 0.7.0 algorithm plugin.

The only part of ``nemo_guide`` that imports NeMo or NeMo-Aligner (``tests/test_imports.py``
enforces it); importing this package itself imports neither, so ``nemo_guide.aligner.config``
validates a run's YAML on a machine without them.

- :mod:`~nemo_guide.aligner.config`: the ``guide`` sections of the Hydra config, validated
  before any model is built (no NeMo import).
- :mod:`~nemo_guide.aligner.parallel`: data-parallel gather and split, rewards on the
  model-parallel source rank (torch.distributed only).
- :mod:`~nemo_guide.aligner.actor`: ``MegatronGPTGuideActorModel``, a subclass of
  Aligner's PPO actor whose loss is ``nemo_guide.core.guide_policy_loss``.
- :mod:`~nemo_guide.aligner.rollouts`: the actor as the ``Generator`` and the scoring and
  training part of the ``Policy`` protocol that the named steps call.
- :mod:`~nemo_guide.aligner.trt_export`: the TensorRT-LLM export (engine config with
  Qwen2's QKV bias, per-TP-rank engine weights, refusals, strict refit check), pure functions;
  :mod:`~nemo_guide.aligner.trt_engine`: the engine wrapper that uses it (GPUs only);
  :mod:`~nemo_guide.aligner.engine_batch`: engine calls padded to the engine's batch;
  :mod:`~nemo_guide.aligner.probe`: the engine-vs-trainer probe at start-up.
- :mod:`~nemo_guide.aligner.trainer`: ``GuideGRPOTrainer``, Algorithm 1 from the named steps.
- :mod:`~nemo_guide.aligner.train`: ``python -m nemo_guide.aligner.train`` (Hydra).
"""
