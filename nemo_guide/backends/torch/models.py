"""Model adapters of the torch backend: the built-in tiny decoder and Hugging Face causal LMs
(``builtin:tiny-llama`` among them).

An adapter gives the backend four things: tokenization (``encode``/``decode``, pad and
EOS ids), final hidden states for a padded batch (``hidden``), the output-layer weight
(``output_weight``, ``[V, H]``, so log-probs go through ``fused_logprobs`` without
``[N, L, V]`` logits) and a sampling step with a KV cache (``step``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from nemo_guide.backends.torch.tiny import CharTokenizer, TinyDecoder, load_tiny, sampling_step
from nemo_guide.errors import RunError

BUILTIN_MODELS = {
    "builtin:tiny": "tiny_digit_ops.safetensors",
    "builtin:tiny-llama": "tiny_llama_digit_ops",
    "builtin:tiny-regimes": "tiny_digit_ops_regimes.safetensors",
}
"""``backend.model`` names of the packaged policies -> their file or directory in ``nemo_guide/assets/``:
``builtin:tiny`` the character-level decoder (``tiny.py``), ``builtin:tiny-llama`` a Hugging
Face ``LlamaForCausalLM`` directory with the same character vocabulary (``tiny_llama.py``),
``builtin:tiny-regimes`` the character-level decoder warm-started on the regimes mixture
(``digit_ops.sft_example(regimes=True)``: known, novel, unseen, rare and wrong operators)."""
ASSETS = Path(__file__).resolve().parents[2] / "assets"


def builtin_path(name: str) -> Path:
    """The packaged file (``builtin:tiny``, ``builtin:tiny-regimes``) or Hugging Face directory
    (``builtin:tiny-llama``) of a built-in policy; ``name`` with or without the ``builtin:`` prefix.

    The NeMo-Aligner side converts ``builtin_path("tiny-llama")`` to a ``.nemo`` checkpoint.

    Raises:
        RunError: an unknown name (the message lists the built-in ones).
        FileNotFoundError: the asset is missing from this installation.
    """
    key = name if name.startswith("builtin:") else f"builtin:{name}"
    if key not in BUILTIN_MODELS:
        raise RunError(f"backend.model = {name!r}: unknown built-in model; choose one of {', '.join(BUILTIN_MODELS)}")
    path = ASSETS / BUILTIN_MODELS[key]
    if not path.exists():
        flag = " --arch llama" if path.suffix != ".safetensors" else " --regimes" if key == "builtin:tiny-regimes" else ""
        raise FileNotFoundError(f"{path} is missing; rebuild it with `nemo-guide warmstart{flag} --overwrite-asset` (see README)")
    return path


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only. Shape: ``[B, S] -> [B, S]``."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class TinyAdapter:
    kind = "builtin"

    def __init__(self, model: TinyDecoder, source: str) -> None:
        self.model = model
        self.tokenizer = CharTokenizer()
        self.source = source
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_ids = (self.tokenizer.eos_token_id,)
        if model.cfg.vocab_size != self.tokenizer.vocab_size:
            raise RunError(f"{source}: vocab_size {model.cfg.vocab_size} does not match the character tokenizer's {self.tokenizer.vocab_size}")

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def hidden(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids, mask)[0]

    def output_weight(self, model: nn.Module) -> torch.Tensor:
        return model.output_weight

    def step(self, model: nn.Module):
        return sampling_step(model)


class HFAdapter:
    kind = "hf"

    def __init__(self, model: nn.Module, tokenizer: Any, source: str) -> None:
        """A Hugging Face causal LM and its tokenizer (:meth:`load` reads them from a directory)."""
        self.source = source
        self.tokenizer = tokenizer
        self.model = model
        config = model.config
        if getattr(config, "final_logit_softcapping", None):
            raise RunError(f"{source}: final_logit_softcapping is not supported by the fused log-prob path")
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise RunError(f"{source}: an output layer with a bias is not supported by the fused log-prob path")
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self.eos_ids = tuple(sorted(e for e in eos if e is not None))
        if not self.eos_ids:
            raise RunError(f"{source}: the tokenizer has no eos_token; set one in tokenizer_config.json")
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad
        self.max_length = int(getattr(config, "max_position_embeddings", 1 << 30))

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype, device: torch.device, source: str | None = None) -> "HFAdapter":
        """The model and tokenizer of a local Hugging Face directory (safetensors weights only)."""
        from nemo_guide.backends.torch import _hf

        path = Path(directory)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"backend.model = {str(directory)!r}: not a Hugging Face model directory (no config.json); "
                "give a local directory with config.json, safetensors weights and a tokenizer, or builtin:tiny"
            )
        tokenizer = _hf.AutoTokenizer.from_pretrained(str(path))
        kwargs = {"dtype": dtype} if _hf.TRANSFORMERS_MAJOR >= 5 else {"torch_dtype": dtype}
        # use_safetensors: never unpickle a .bin checkpoint.
        model = _hf.AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, **kwargs).to(device)
        return cls(model, tokenizer, str(directory) if source is None else source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        except Exception as exc:  # the tokenizers library raises a bare Exception for text it cannot map
            if type(exc) is not Exception:
                raise
            vocab = self.tokenizer.get_vocab()
            bad = sorted({ch for ch in text if ch not in vocab})
            raise ValueError(f"the tokenizer of {self.source} cannot encode {bad or text[:80]!r} in {text[:80]!r} ({exc})") from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def hidden(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.base_model(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask), use_cache=False)
        return out[0]

    def output_weight(self, model: nn.Module) -> torch.Tensor:
        return model.get_output_embeddings().weight

    def step(self, model: nn.Module):
        """``sampling.generate``'s step; with a ``capacity``, the KV cache is allocated once on the
        prefill call where transformers allows it (``hf_cache.preallocated_cache``)."""

        def fn(ids: torch.Tensor, mask: torch.Tensor, cache: Any, capacity: int | None = None):
            if cache is None and capacity is not None:
                from nemo_guide.backends.torch.hf_cache import preallocated_cache

                cache = preallocated_cache(model, capacity)  # None: the model grows its own
            positions = positions_from_mask(mask)[:, -ids.shape[1]:]
            out = model(
                input_ids=ids,
                attention_mask=mask.long(),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1], out.past_key_values

        return fn


def load_adapter(name: str, dtype: torch.dtype, device: torch.device):
    """``builtin:<name>``, a ``.safetensors`` file written by the tiny model, or an HF directory."""
    if name.startswith("builtin:"):
        path = builtin_path(name)
        if path.is_dir():
            return HFAdapter.load(path, dtype, device, source=name)
        model, _ = load_tiny(path)
        return TinyAdapter(model.to(device=device, dtype=dtype), name)
    if name.endswith(".safetensors"):
        model, _ = load_tiny(name)
        return TinyAdapter(model.to(device=device, dtype=dtype), name)
    return HFAdapter.load(name, dtype, device)
