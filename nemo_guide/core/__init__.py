"""Pure-torch algorithm core of Guide-GRPO.

Shape notation used across the repository: ``B`` prompts, ``G`` rollouts per prompt
(k in the paper), ``N`` rollouts in a batch (plain + guided), ``L`` response length,
``V`` vocabulary, ``H`` hidden size. Core tensors are batch-first ``[N, L]``.
Nothing here imports transformers, NeMo, Megatron or TensorRT-LLM.
"""

from nemo_guide.core.advantages import equal_reward_groups, group_advantages
from nemo_guide.core.guidance import GuidanceThreshold, GuidedGroupMode, assemble_groups, select_for_guidance
from nemo_guide.core.kl import KLEstimator, kl_penalty
from nemo_guide.core.loss import Aggregation, Shaping, ShapingScope, aggregate, guide_policy_loss, shape_ratios
from nemo_guide.core.metrics import absolute_k, decompose_progress, decompose_progress_expected, pass_at_k

__all__ = [
    "Aggregation",
    "GuidanceThreshold",
    "GuidedGroupMode",
    "KLEstimator",
    "Shaping",
    "ShapingScope",
    "absolute_k",
    "aggregate",
    "assemble_groups",
    "decompose_progress",
    "decompose_progress_expected",
    "equal_reward_groups",
    "group_advantages",
    "guide_policy_loss",
    "kl_penalty",
    "pass_at_k",
    "select_for_guidance",
    "shape_ratios",
]
