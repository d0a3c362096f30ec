"""NeMo 2.1 loads the ``.nemo`` files of ``nemo-guide convert hf-to-nemo``, and ``nemo-to-hf`` reads
the files NeMo itself writes.

Tiny random Qwen2 (QKV bias, tied, GQA 4/2) and Llama (untied, GQA 4/2, head_dim 24 != 64/4,
Llama 3.1 RoPE scaling) with a byte-level BPE tokenizer, built here with transformers 4.48. The
conversion runs as the CLI does, in a process without NeMo. A worker process
(``workers/nemo_restore.py``, CPU patches of ``nemo_cpu`` and ``nemo_env``) then calls
``MegatronGPTModel.restore_from(path, trainer=Trainer(cpu, NLPDDPStrategy))`` at world size 1
and measures weights (bit-exact after the key map), logits (float32, vs ``AutoModelForCausalLM``)
and tokenizer ids; it also saves each model again with NeMo's ``save_to``.

The Llama file is converted from a copy of its directory that is deleted before NeMo restores it,
as when a ``.nemo`` moves to another machine: NeMo 2.1 hands ``tokenizer.type`` to transformers
unresolved, so the restore points ``tokenizer.type`` at the tokenizer files bundled in the
``.nemo`` (``./hf/``), extracted with ``tar``.

Run: ``.venv-aligner/bin/python -m pytest tests_aligner/test_nemo_convert.py`` (about a minute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VOCAB = 320


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], timeout: int = 600) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[1:4])} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _convert(*args) -> None:
    _run([sys.executable, "-m", "nemo_guide.cli", "convert", *map(str, args)])


def _save_hf(family: str, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    if family == "qwen2":
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=24, max_position_embeddings=16384, tie_word_embeddings=False,
                             rms_norm_eps=1e-5, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
    torch.manual_seed({"qwen2": 1, "llama": 2}[family])
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "2 + 3 = 5", "hello world"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, HF dirs, bundled tokenizer dir, the worker's measurements per family)."""
    root = tmp_path_factory.mktemp("nemo_convert")
    hf = {family: root / f"hf_{family}" for family in ("qwen2", "llama")}
    for family, path in hf.items():
        _save_hf(family, path)
    _convert("hf-to-nemo", hf["qwen2"], root / "qwen2.nemo")
    moved = root / "llama_moved"  # converted from here, then gone
    shutil.copytree(hf["llama"], moved)
    _convert("hf-to-nemo", moved, root / "llama.nemo")
    shutil.rmtree(moved)
    with tarfile.open(root / "llama.nemo", "r:") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("./hf/")]
        tar.extractall(root / "llama_extracted", members=members, filter="data")
    bundled = root / "llama_extracted" / "hf"
    args = []
    for family, tokenizer in (("qwen2", "-"), ("llama", str(bundled))):
        (root / f"resaved_{family}").mkdir()  # NeMo's save_to writes model_weights/ next to the file
        args += [root / f"{family}.nemo", hf[family], root / f"resaved_{family}" / "model.nemo", tokenizer]
    _run([sys.executable, str(HERE / "workers" / "nemo_restore.py"), str(root / "out.json"), *map(str, args)], timeout=900)
    out = json.loads((root / "out.json").read_text())
    measured = dict(zip(("qwen2", "llama"), out["models"], strict=True))
    return root, hf, bundled, measured


FAMILIES = ("qwen2", "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_weights_equal_hf_bit_exact(run, family):
    m = run[3][family]
    assert m["keys_equal"] and m["unequal"] == [], m["unequal"]
    assert m["dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_logits_equal_hf(run, family):
    m = run[3][family]
    assert m["logits_shape"][-1] == VOCAB  # no padded vocabulary rows
    assert m["logits_max_abs_diff"] <= 1e-5, m
    assert m["logits_max_abs"] > 0.1  # not a degenerate model


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_tokenizer_equals_hf(run, family):
    root, hf, bundled, measured = run
    m = measured[family]
    assert all(m["ids_equal"]), m
    # Qwen2: tokenizer.type as written (the HF directory); Llama: the files bundled in the .nemo
    assert m["tokenizer_type"] == (str(hf["qwen2"].resolve()) if family == "qwen2" else str(bundled))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (bundled / name).read_bytes() == (hf["llama"] / name).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_nemo_saved_file_converts_back_bit_exact(run, family):
    """NeMo's own ``save_to`` of the restored model: same layout, no ``hf_config.json`` inside
    (NeMo keeps only its registered artifacts), so ``--hf-config``; the tokenizer files come from
    the ``tokenizer.type`` directory."""
    from nemo_guide.cli import main
    from nemo_guide.convert import load_hf_state_dict

    root, hf, _, measured = run
    assert measured[family]["resaved"], measured[family].get("resave_error")
    resaved = root / f"resaved_{family}" / "model.nemo"
    with tarfile.open(resaved, "r:") as tar:
        names = set(tar.getnames())
    assert {"./model_config.yaml", "./model_weights/metadata.json"} <= names and "./hf_config.json" not in names
    back = root / f"back_{family}"
    assert main(["convert", "nemo-to-hf", str(resaved), str(back), "--hf-config", str(hf[family] / "config.json")]) == 0
    original, restored = load_hf_state_dict(hf[family]), load_hf_state_dict(back)
    assert set(restored) == set(original)
    assert [k for k, v in original.items() if not torch.equal(restored[k], v)] == []
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (hf[family] / name).read_bytes(), name
