"""``nemo-guide convert hf-to-nemo | nemo-to-hf``: the ``.nemo`` layout NeMo 2.1 restores, its
``model_config.yaml``, a bit-exact round trip (weights, config.json, tokenizer files) for a tiny
random Qwen2 (QKV bias, tied and untied) and Llama (untied, GQA, head_dim != hidden/heads, Llama 3.1
RoPE scaling), and the refusals.

That NeMo itself restores these files (weights, logits, tokenizer) is checked in the aligner tier,
``tests_aligner/test_nemo_convert.py``.
"""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from omegaconf import OmegaConf

from nemo_guide.cli import main
from nemo_guide.convert import load_hf_state_dict

VOCAB = 320
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tokenizer():
    """A byte-level BPE trained here (no download), as Qwen2 and Llama 3 use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "2 + 3 = 5", "hello world"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def hf_config(family: str):
    from transformers import LlamaConfig, Qwen2Config

    if family.startswith("qwen2"):  # QKV bias, GQA 4/2; tied embeddings, or untied as Qwen2.5-7B
        return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=family == "qwen2")
    # untied, GQA 4/2, head_dim 24 != 64/4, Llama 3.1 RoPE scaling
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=24, max_position_embeddings=16384, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> a saved tiny random model with tokenizer and generation config."""
    from transformers import AutoModelForCausalLM

    out = {}
    tok = _tokenizer()
    for seed, family in enumerate(("qwen2", "llama", "qwen2_untied")):
        path = tmp_path_factory.mktemp(f"hf_{family}")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
        with torch.no_grad():  # non-trivial norms and biases, so that a swapped mapping shows
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.3)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(scope="module")
def nemo_files(hf_dirs, tmp_path_factory):
    """family -> the .nemo file ``hf-to-nemo`` wrote from it."""
    root = tmp_path_factory.mktemp("nemo")
    out = {}
    for family, path in hf_dirs.items():
        out[family] = root / f"{family}.nemo"
        assert main(["convert", "hf-to-nemo", str(path), str(out[family])]) == 0
    return out


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix != ".safetensors"}


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen2_untied"])
def test_hf_nemo_hf_is_bit_exact(hf_dirs, nemo_files, tmp_path, family):
    back = tmp_path / "back"
    assert main(["convert", "nemo-to-hf", str(nemo_files[family]), str(back)]) == 0
    original, restored = load_hf_state_dict(hf_dirs[family]), load_hf_state_dict(back)
    assert set(restored) == set(original)
    for key, value in original.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
    # config.json, generation_config.json and the tokenizer files come back byte for byte
    assert _files(back) == _files(hf_dirs[family])
    assert {"config.json", "generation_config.json", *TOKENIZER_FILES} <= set(_files(back))
    assert not list(tmp_path.glob(".*staging*"))  # the scratch directory is gone


def test_tar_layout_is_the_one_nemo_writes(nemo_files, hf_dirs):
    path = nemo_files["qwen2"]
    assert path.read_bytes()[:2] != b"\x1f\x8b"  # not gzipped: NeMo writes plain tars
    with tarfile.open(path, "r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert all(name == "." or name.startswith("./") for name in members)  # tar.add(folder, arcname=".")
    names = set(members)
    assert {"./model_config.yaml", "./model_weights/metadata.json", "./model_weights/common.pt", "./hf_config.json"} <= names
    assert any(n.startswith("./model_weights/") and n.endswith(".distcp") for n in names)
    assert {f"./hf/{name}" for name in (*TOKENIZER_FILES, "generation_config.json")} <= names
    assert all(m.isfile() or m.isdir() for m in members.values())  # no links
    with tarfile.open(path, "r:") as tar:
        assert tar.extractfile("./hf_config.json").read() == (hf_dirs["qwen2"] / "config.json").read_bytes()


def _model_config(path) -> dict:
    with tarfile.open(path, "r:") as tar:
        return OmegaConf.to_container(OmegaConf.create(tar.extractfile("./model_config.yaml").read().decode()))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_model_config_describes_the_model(nemo_files, hf_dirs, family):
    cfg = _model_config(nemo_files[family])
    qwen = family == "qwen2"
    expected = {
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "mcore_gpt": True, "transformer_engine": False, "precision": 32,
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128 if qwen else 96, "num_attention_heads": 4,
        "num_query_groups": 2, "kv_channels": 16 if qwen else 24,
        "encoder_seq_length": 256 if qwen else 16384, "max_position_embeddings": 256 if qwen else 16384,
        "position_embedding_type": "rope", "rotary_base": 10000.0 if qwen else 500000.0, "rotary_percentage": 1.0,
        "scale_positional_embedding": not qwen,  # NeMo's Llama 3.1 RoPE scaling (factor 8, 1, 4, 8192)
        "normalization": "rmsnorm", "layernorm_epsilon": 1e-6 if qwen else 1e-5, "activation": "fast-swiglu",
        "bias": False, "qkv_bias": qwen, "share_embeddings_and_output_weights": qwen,
        "override_vocab_size": VOCAB, "make_vocab_size_divisible_by": 64,
        "dist_ckpt_format": "torch_dist",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    # NeMo pads the vocabulary to a multiple of make_vocab_size_divisible_by: here that pads nothing
    divisor = cfg["make_vocab_size_divisible_by"]
    assert -(-VOCAB // divisor) * divisor == VOCAB
    assert cfg["tokenizer"]["library"] == "huggingface" and cfg["tokenizer"]["use_fast"] is True
    assert cfg["tokenizer"]["type"] == str(hf_dirs[family].resolve())


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_weights_have_nemo_keys_stacked_by_layer(nemo_files, tmp_path, family):
    """The keys of NeMo's ``MegatronGPTModel.sharded_state_dict()``: ``model.`` + megatron-core's,
    layers stacked on a leading axis, TransformerEngine names for the pre-norms."""
    from megatron.core import dist_checkpointing

    with tarfile.open(nemo_files[family], "r:") as tar:
        tar.extractall(tmp_path, filter="data")
    meta = dist_checkpointing.load_tensors_metadata(str(tmp_path / "model_weights"))
    layer = "model.decoder.layers."
    shapes = {k: tuple(v.global_shape) for k, v in meta.items()}
    qkv_rows = (4 + 2 * 2) * (16 if family == "qwen2" else 24)
    assert shapes[layer + "self_attention.linear_qkv.weight"] == (2, qkv_rows, 64)
    assert shapes[layer + "self_attention.linear_qkv.layer_norm_weight"] == (2, 64)
    assert shapes[layer + "mlp.linear_fc1.layer_norm_weight"] == (2, 64)
    assert shapes["model.embedding.word_embeddings.weight"] == (VOCAB, 64)
    assert shapes["model.decoder.final_layernorm.weight"] == (64,)
    assert (layer + "self_attention.linear_qkv.bias" in shapes) == (family == "qwen2")
    assert ("model.output_layer.weight" in shapes) == (family == "llama")
    assert all(k.startswith("model.") for k in shapes)


def test_cast_dtype_and_vocab_padding_stripped(hf_dirs, nemo_files, tmp_path):
    """--dtype bfloat16 casts (and says so in config.json); embedding rows past the HF config's
    vocab_size (NeMo's padding of files written elsewhere) are dropped."""
    src = hf_dirs["llama"]
    bf16 = tmp_path / "bf16.nemo"
    assert main(["convert", "hf-to-nemo", str(src), str(bf16), "--dtype", "bfloat16"]) == 0
    assert _model_config(bf16)["precision"] == "bf16"
    back = tmp_path / "bf16_hf"
    assert main(["convert", "nemo-to-hf", str(bf16), str(back)]) == 0  # auto: the stored bfloat16
    original, restored = load_hf_state_dict(src), load_hf_state_dict(back)
    assert [k for k, v in original.items() if not torch.equal(restored[k], v.to(torch.bfloat16))] == []
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"

    smaller = tmp_path / "config.json"
    smaller.write_text(json.dumps({**json.loads((src / "config.json").read_text()), "vocab_size": 300}))
    cut = tmp_path / "cut"
    assert main(["convert", "nemo-to-hf", str(nemo_files["llama"]), str(cut), "--hf-config", str(smaller)]) == 0
    restored = load_hf_state_dict(cut)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(restored[key], original[key][:300])


def test_refusals_are_one_line_errors(hf_dirs, nemo_files, tmp_path, capsys):
    def refused(argv, message):
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err, err

    existing = tmp_path / "taken.nemo"
    existing.write_text("")
    refused(["hf-to-nemo", str(hf_dirs["qwen2"]), str(existing)], "exists; choose a new output file (nothing is overwritten)")
    assert existing.read_text() == ""
    taken = tmp_path / "taken_dir"
    taken.mkdir()
    refused(["nemo-to-hf", str(nemo_files["qwen2"]), str(taken)], "exists; choose a new output directory")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    refused(["hf-to-nemo", str(gpt2), str(tmp_path / "gpt2.nemo")], "model_type 'gpt2' is not supported")
    assert not (tmp_path / "gpt2.nemo").exists()

    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((hf_dirs["qwen2"] / name).read_bytes())
    refused(["hf-to-nemo", str(no_tokenizer), str(tmp_path / "w.nemo")], "no tokenizer files")
    # --tokenizer names one (a directory or a Hub name): written as NeMo's tokenizer.type
    assert main(["convert", "hf-to-nemo", str(no_tokenizer), str(tmp_path / "w.nemo"), "--tokenizer", "Qwen/Qwen2.5-0.5B"]) == 0
    assert _model_config(tmp_path / "w.nemo")["tokenizer"]["type"] == "Qwen/Qwen2.5-0.5B"
    refused(["nemo-to-hf", str(tmp_path / "w.nemo"), str(tmp_path / "o0"), "--tokenizer", "x"], "--tokenizer is an option of hf-to-nemo")

    not_tar = tmp_path / "not.nemo"
    not_tar.write_bytes(b"plain text, not a tar archive" * 100)
    refused(["nemo-to-hf", str(not_tar), str(tmp_path / "o1")], f"{not_tar}: cannot be read as a .nemo (tar) file")

    bare = tmp_path / "bare.nemo"  # a .nemo written elsewhere: no hf_config.json inside
    with tarfile.open(nemo_files["qwen2"], "r:") as src, tarfile.open(bare, "w:") as dst:
        for member in src.getmembers():
            if member.name != "./hf_config.json":
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    refused(["nemo-to-hf", str(bare), str(tmp_path / "o2")], "pass --hf-config")
    refused(["nemo-to-hf", str(bare), str(tmp_path / "o3"), "--hf-config", str(hf_dirs["llama"] / "config.json")],
            "model_config.yaml does not describe the model of the Hugging Face config: ffn_hidden_size = 128")
    refused(["hf-to-megatron", str(hf_dirs["qwen2"]), str(tmp_path / "o4"), "--dtype", "auto"], "--dtype auto is an option of hf-to-nemo and nemo-to-hf")
    assert not any(p.name.startswith((".o", "o")) for p in tmp_path.iterdir())  # nothing half-written
