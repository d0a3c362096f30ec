"""``builtin:tiny-llama``: the character-level Hugging Face tokenizer, the shipped Llama
directory and its build record, and one Guide step on it in the embedded backend."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_guide.backends.torch import tiny_llama
from nemo_guide.backends.torch.models import BUILTIN_MODELS, builtin_path, load_adapter
from nemo_guide.backends.torch.tiny import CharTokenizer
from nemo_guide.backends.torch.warmstart import LLAMA_ASSET, probe_accuracy
from nemo_guide.cli import main
from nemo_guide.data import digit_ops
from nemo_guide.errors import RunError

PRINTABLE = "\n" + "".join(chr(c) for c in range(32, 127))
FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "build.json"}


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(builtin_path("builtin:tiny-llama"))


def random_texts(seed: int, n: int) -> list[str]:
    """Printable ASCII and newlines, spaces over-represented (runs, leading, trailing)."""
    rng = random.Random(seed)
    alphabet = PRINTABLE + " " * 30 + "\n" * 10
    texts = ["", " ", "  ", "\n", " \n ", "a b", "  a  ", "\n\nQ:47#31=\n", "<eos>", "x<pad>y<bos>", "<unused_3>"]
    for _ in range(n):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))))
    return texts


def test_vocabulary_extends_the_char_tokenizer_to_128_ids():
    vocab = tiny_llama.vocabulary()
    assert len(vocab) == tiny_llama.VOCAB_SIZE == 128 and all(128 % tp == 0 for tp in (1, 2, 4, 8))
    tok = CharTokenizer()
    # 0-2 specials, then "\n" (3), " " (4) .. "~" (98), then <unused_0> (99) .. <unused_28> (127)
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "\n", " ", "~", "<unused_0>", "<unused_28>")] == [0, 1, 2, 3, 4, 98, 99, 127]
    assert all(vocab[ch] == tok.encode(ch)[0] for ch in PRINTABLE)


@pytest.mark.parametrize("seed", range(3))
def test_ids_equal_the_char_tokenizer_and_decode_round_trips(shipped_tokenizer, seed):
    tok, char = shipped_tokenizer, CharTokenizer()
    for text in random_texts(seed, 150):
        ids = char.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text)
        assert tok.encode(text) == [tiny_llama.BOS_ID, *ids], repr(text)  # add_special_tokens=True: <bos> first
        assert tok.decode(ids, skip_special_tokens=True) == text, repr(text)  # no spaces inserted, none cleaned up
        assert tok.decode([tiny_llama.BOS_ID, *ids, tiny_llama.EOS_ID, tiny_llama.PAD_ID], skip_special_tokens=True) == text


def test_special_tokens_and_unknown_characters(shipped_tokenizer):
    tok = shipped_tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 128)
    assert tok.decode([69, 2, 70]) == "a<eos>b"  # kept without skip_special_tokens
    with pytest.raises(Exception, match="Missing \\[UNK\\]"):  # no unknown token: the library refuses
        tok.encode("caf\u00e9", add_special_tokens=False)
    adapter = load_adapter("builtin:tiny-llama", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot encode \\['\\\\t', '\u00e9'\\]"):  # the backend's protocol: ValueError
        adapter.encode("caf\u00e9\t", True)
    with pytest.raises(ValueError, match="cannot encode"):
        CharTokenizer().encode("caf\u00e9")


def test_shipped_tokenizer_files_are_what_the_code_builds(tmp_path):
    tiny_llama.save_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((LLAMA_ASSET / name).read_text()), name


def test_shipped_directory_is_a_tiny_llama():
    path = builtin_path("tiny-llama")
    assert path == builtin_path("builtin:tiny-llama") == LLAMA_ASSET and FILES <= {p.name for p in path.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (128, 3, 4, 2, 352)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (128, 128, False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # untied
    assert model.generation_config.eos_token_id == tiny_llama.EOS_ID
    assert json.loads((path / "config.json").read_text())["rope_theta"] == 10000.0
    build = tiny_llama.read_build(path)
    assert build["parameters"] == sum(p.numel() for p in model.parameters())


def test_builtin_names():
    assert set(BUILTIN_MODELS) == {"builtin:tiny", "builtin:tiny-llama", "builtin:tiny-regimes"}
    assert builtin_path("tiny").name == "tiny_digit_ops.safetensors"
    assert builtin_path("builtin:tiny-regimes").name == "tiny_digit_ops_regimes.safetensors"
    with pytest.raises(RunError, match="builtin:tiny, builtin:tiny-llama, builtin:tiny-regimes"):
        builtin_path("builtin:gpt")


def test_shipped_build_record_is_current():
    build = tiny_llama.read_build(LLAMA_ASSET)
    assert build["task_version"] == digit_ops.TASK_VERSION, "rebuild with `nemo-guide warmstart --arch llama --overwrite-asset` (README)"
    assert build["command"].startswith("nemo-guide warmstart --arch llama")
    acc = build["probe_accuracy"]
    assert acc["known"] >= 0.95 and acc["novel_hinted"] >= 0.9 and acc["unseen_hinted"] >= 0.9
    assert acc["novel"] <= 0.25 and acc["unseen"] <= 0.25


def test_shipped_policy_needs_the_hint_for_novel_operators():
    adapter = load_adapter("builtin:tiny-llama", torch.float32, torch.device("cpu"))
    assert adapter.kind == "hf" and adapter.source == "builtin:tiny-llama"
    acc = probe_accuracy(adapter, n=24, seed=7)
    assert acc["known"] >= 0.9  # solved without hints
    assert acc["novel_hinted"] >= 0.85 and acc["unseen_hinted"] >= 0.85  # follows hints
    assert acc["novel"] <= 0.25 and acc["unseen"] <= 0.25  # but cannot solve them unhinted


def test_shipped_weights_convert_to_megatron_with_query_groups():
    from nemo_guide.convert import hf_to_megatron, load_hf_state_dict, megatron_to_hf, read_hf_shape, shard_tp, unshard_tp

    shape, _ = read_hf_shape(LLAMA_ASSET)
    assert (shape.family, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.tie_word_embeddings) == ("llama", 4, 2, 32, False)
    hf = load_hf_state_dict(LLAMA_ASSET)
    mg = hf_to_megatron(hf, shape)
    # fused QKV rows per query group: 2 query heads + 1 key + 1 value head of 32 rows, 2 groups
    assert mg["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (2 * (2 + 1 + 1) * 32, 128)
    merged = unshard_tp([shard_tp(mg, shape, 2, r) for r in range(2)])
    back = megatron_to_hf(merged, shape)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    # 2 key-value heads: tensor parallelism stops at 2 (the 128-id vocabulary would allow 8)
    with pytest.raises(ValueError, match="num_key_value_heads = 2 is not divisible by tensor_model_parallel_size = 4"):
        shard_tp(mg, shape, 4, 0)


def test_warmstart_llama_command_writes_a_loadable_directory(tmp_path):
    out = tmp_path / "tl"
    assert main(["warmstart", "--arch", "llama", "--out", str(out), "--steps", "3", "--batch-size", "8", "--threads", "1"]) == 0
    assert FILES <= {p.name for p in out.iterdir()} and not list(tmp_path.glob("tl.tmp-*"))
    build = tiny_llama.read_build(out)
    assert build["command"] == "nemo-guide warmstart --arch llama --steps 3 --batch-size 8 --lr 0.002 --seed 0"
    assert build["task_version"] == digit_ops.TASK_VERSION and build["arch"] == "llama"
    assert set(build["probe_accuracy"]) == {"known", "novel_hinted", "unseen_hinted", "novel", "unseen"}
    adapter = load_adapter(str(out), torch.float32, torch.device("cpu"))
    assert adapter.eos_ids == (2,) and adapter.pad_id == 0 and adapter.max_length == 128
    assert all(torch.isfinite(p).all() for p in adapter.model.parameters())
    # a second build replaces the directory
    assert main(["warmstart", "--arch", "llama", "--out", str(out), "--steps", "1", "--batch-size", "2", "--threads", "1"]) == 0
    assert tiny_llama.read_build(out)["steps"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["tl"]


def test_warmstart_llama_needs_out_or_overwrite_asset(capsys):
    assert main(["warmstart", "--arch", "llama"]) == 2
    err = capsys.readouterr().err
    assert "--out DIR" in err and "builtin:tiny-llama" in err and str(LLAMA_ASSET) in err


def test_guide_trains_on_tiny_llama_in_the_embedded_backend(tiny_cfg):
    from nemo_guide.backends.torch.backend import TorchBackend
    from nemo_guide.cli import make_backend
    from nemo_guide.loop import train
    from nemo_guide.tracking import read_metrics

    cfg = tiny_cfg("run.steps=2", "backend.model=builtin:tiny-llama", "data.eval_limit=4")
    backend = make_backend(cfg)
    assert isinstance(backend, TorchBackend) and backend.adapter.kind == "hf"
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    summary = train(cfg, backend, progress=False, log=lambda s: None)
    assert summary["steps"] == 2
    rows = read_metrics(cfg.run.run_dir)
    assert all(r["optim/skipped"] == 0 and r["optim/updates"] == 1 for r in rows[1:])
    assert any(r["train/guided_frac"] > 0 for r in rows[1:])  # novel prompts fail unhinted and get guided
    changed = [k for k, v in backend.model.state_dict().items() if not torch.equal(before[k], v)]
    assert len(changed) == len(before)


def test_eval_command_hashes_the_builtin_directory(tmp_path, capsys):
    from conftest import SMALL, TINY_CONF

    out = tmp_path / "eval"
    args = ["eval", str(TINY_CONF), *SMALL, "backend.model=builtin:tiny-llama", "--limit", "2", "--n", "1", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert any(out.iterdir())
