import os
from pathlib import Path

# Threads. torch sizes its thread pool from OMP_NUM_THREADS once, when it is imported, so the
# variable must be set before `import torch` (setting it in a fixture, after the import,
# changes nothing). The suite runs with one intra-op thread per process unless the caller
# sets OMP_NUM_THREADS: its tensors are tiny (hidden sizes 24-128), where a second thread buys
# nothing and OpenMP's synchronisation turns into long spin-waits as soon as the 2-core CI
# machine is shared, or while the gloo tests run two worker processes at once (measured on
# 2 cores shared with other jobs: tests/test_builtin.py 79 s with 2 threads, 5 s with 1).
# Processes the tests spawn (gloo workers, CLI subprocesses) inherit the variable.
if not os.environ.get("OMP_NUM_THREADS", "").strip():  # unset or empty
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU (set before triton is first imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARKS = SHARED / "data" / "benchmarks"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO = Path(__file__).resolve().parents[1]
TINY_CONF = REPO / "conf" / "tiny_cpu.yaml"
# A few-step version of the main job: small batches, a short held-out prefix.
SMALL = [
    "data.prompt_batch_size=4",
    "algorithm.group_size=4",
    "data.eval_limit=8",
    "run.eval_every=0",
    "run.save_every=0",
]


def tiny_config(tmp_path, *overrides):
    """conf/tiny_cpu.yaml made small, writing under ``tmp_path``."""
    from nemo_guide.config import load_config

    return load_config(TINY_CONF, [*SMALL, f"run.output_dir={tmp_path}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)


def build_char_tokenizer_dir(path):
    """A character-level Hugging Face fast tokenizer (pad/eos/unk + printable ASCII), saved to ``path``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<eos>", "<unk>"] + [chr(c) for c in range(32, 127)]
    vocab = {ch: i for i, ch in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast, len(chars)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """A randomly initialised Qwen2-architecture causal LM (2 layers, GQA, QKV bias), built from a config."""
    pytest.importorskip("transformers")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2_tiny")
    fast, vocab = build_char_tokenizer_dir(path)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path
