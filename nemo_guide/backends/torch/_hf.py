"""The one guarded import of transformers and tokenizers (the ``hf`` extra) in the torch backend."""

from __future__ import annotations

try:
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("Hugging Face models need the 'hf' extra: pip install -e '.[hf]'") from exc

try:  # per-layer cache objects (transformers >= 4.56); older versions keep their growing cache
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - exercised only with an old transformers
    DynamicCache = DynamicLayer = None

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
"""5 renamed ``from_pretrained(torch_dtype=...)`` to ``dtype=...``."""

__all__ = [
    "AddedToken",
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "DynamicCache",
    "DynamicLayer",
    "GenerationConfig",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Regex",
    "TRANSFORMERS_MAJOR",
    "Tokenizer",
    "decoders",
    "models",
    "pre_tokenizers",
    "processors",
    "transformers",
]
