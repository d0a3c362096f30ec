"""``builtin:tiny-llama``: the built-in policy as a Hugging Face Llama model and tokenizer.

The same character vocabulary as :class:`~nemo_guide.backends.torch.tiny.CharTokenizer`,
built with the ``tokenizers`` library (nothing downloaded), and a ~580K-parameter
``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output
layer, no biases). ``nemo-guide warmstart --arch llama`` trains it on the digit-ops
mixture and writes a Hugging Face directory, so that the embedded backend (through
``HFAdapter``), Megatron-core and NeMo load the same weights
(``nemo_guide/assets/tiny_llama_digit_ops/``, see :func:`save_tiny_llama`).

The tokenizer (``AutoTokenizer.from_pretrained(dir)``):

- ids 0-2 are ``<pad> <bos> <eos>``, then ``\\n`` and ASCII 32-126 (ids 3-98, as
  ``CharTokenizer``), then special ``<unused_0>`` .. ``<unused_28>`` up to exactly
  :data:`VOCAB_SIZE` = 128 ids, which divides by tensor-parallel sizes 1, 2, 4 and 8
  (NeMo's ``make_vocab_size_divisible_by=128`` adds no padding);
- ``encode(text, add_special_tokens=False)`` equals ``CharTokenizer().encode(text)``;
  ``add_special_tokens=True`` prepends ``<bos>`` (the Llama convention; the warm start
  trains on ``<bos> prompt solution <eos>``, and the embedded backend encodes plain
  prompts that way);
- ``decode(ids, skip_special_tokens=True)`` returns the text exactly (the ``Fuse``
  decoder joins characters without spaces; ``clean_up_tokenization_spaces`` is off);
- the text ``<eos>`` is five characters, not the token (``split_special_tokens``), as in
  ``CharTokenizer``;
- there is no unknown token: for a character outside printable ASCII and newline the
  ``tokenizers`` library raises a plain ``Exception`` ("WordLevel error: Missing [UNK]
  token from the vocabulary"), which the embedded backend's adapter reports as a
  ``ValueError`` naming the characters, like ``CharTokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from nemo_guide.backends.torch import _hf
from nemo_guide.backends.torch.tiny import CHARS, SPECIALS

VOCAB_SIZE = 128
UNUSED = tuple(f"<unused_{i}>" for i in range(VOCAB_SIZE - len(SPECIALS) - len(CHARS)))
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BUILD_RECORD = "build.json"
"""The build record in the model directory (command, task version, probe accuracies)."""

CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
"""The ``LlamaConfig`` of ``builtin:tiny-llama`` (head dim 32; 2 key-value heads for 4 query
heads, so a Megatron conversion exercises the grouped QKV layout)."""

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "model_max_length": CONFIG["max_position_embeddings"],
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": True,
    "padding_side": "left",
    # no token_type_ids: transformers 4.x's generate() refuses them for Llama
    "model_input_names": ["input_ids", "attention_mask"],
}
"""``tokenizer_config.json``, written by hand so transformers 4.x (NeMo containers) and 5.x read it."""


def vocabulary() -> dict[str, int]:
    """Token -> id, :data:`VOCAB_SIZE` entries."""
    tokens = [*SPECIALS, *CHARS, *UNUSED]
    assert len(tokens) == VOCAB_SIZE and len(set(tokens)) == VOCAB_SIZE
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer():
    """The ``tokenizers.Tokenizer``: one token per character (see the module docstring)."""
    tok = _hf.Tokenizer(_hf.models.WordLevel(vocabulary(), unk_token=None))
    # Every character its own piece; [\s\S] (not ".") so that newlines are characters too.
    tok.pre_tokenizer = _hf.pre_tokenizers.Split(_hf.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = _hf.decoders.Fuse()
    tok.add_special_tokens([_hf.AddedToken(t, special=True, normalized=False) for t in (*SPECIALS, *UNUSED)])
    tok.post_processor = _hf.processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return tok


def save_tokenizer(directory: str | Path) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    special = {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token")}
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(directory: str | Path):
    return _hf.AutoTokenizer.from_pretrained(str(directory))


def new_tokenizer():
    """The tokenizer as ``AutoTokenizer`` loads it from the files :func:`save_tokenizer` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tmp)
        return load_tokenizer(tmp)


def new_model():
    """A freshly initialised float32 ``LlamaForCausalLM`` of :data:`CONFIG` (seed torch first)."""
    model = _hf.LlamaForCausalLM(_hf.LlamaConfig(**CONFIG))
    model.generation_config = _hf.GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_tiny_llama(directory: str | Path, model, record: dict) -> Path:
    """Write a Hugging Face directory: ``config.json``, ``generation_config.json``,
    ``model.safetensors``, the tokenizer files and :data:`BUILD_RECORD`.

    Written to ``<directory>.tmp-<pid>`` and renamed, so a reader never sees half a model;
    an existing ``directory`` is replaced.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))  # config.json, generation_config.json, model.safetensors
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    config.setdefault("rope_theta", CONFIG["rope_theta"])  # transformers 4.x readers look for it here
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_tokenizer(tmp)
    (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if directory.exists():
        old = directory.with_name(directory.name + f".old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(directory)
    return directory


def read_build(directory: str | Path) -> dict:
    """The :data:`BUILD_RECORD` of a directory written by :func:`save_tiny_llama`."""
    return json.loads((Path(directory) / BUILD_RECORD).read_text(encoding="utf-8"))
