"""The one guarded import of megatron-core (pinned to 0.10.0, NeMo-Aligner 0.7.0's)."""

from __future__ import annotations

try:
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Megatron backend needs megatron-core 0.10.0: pip install -e '.[megatron]' "
        "(or use the NGC NeMo container of NeMo-Aligner 0.7.0, see containers/)"
    ) from exc

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False

__all__ = [
    "GPTModel",
    "MCoreSavePlanner",
    "SaveShardedStrategy",
    "_replace_state_dict_keys_with_sharded_keys",
    "mcore_to_pyt_state_dict",
    "HAVE_TE",
    "TransformerConfig",
    "dist_checkpointing",
    "get_forward_backward_func",
    "get_gpt_layer_local_spec",
    "get_gpt_layer_with_transformer_engine_spec",
    "parallel_state",
    "tensor_parallel",
]
