"""The TensorRT-LLM export's pure pieces (nemo_guide.aligner.trt_export), on CPU.

The engine itself needs a GPU (tests_aligner/test_trt_gpu.py). Here: the engine config of a
Qwen2 gets attention bias and a Llama does not; every refusal names its model field; the
per-TP-rank weight dict has the engine's names and shapes, the q/k/v biases of the right
heads and the zero output-projection biases; and a plain-torch forward that computes what
TensorRT-LLM's Llama graph computes (per TP rank, partial sums added like its all-reduce)
from those weights gives the Hugging Face Qwen2's logits, while the same weights without the
QKV bias (the stock export's engine) do not.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_guide.aligner.trt_export import (
    ExportError,
    engine_weight_shapes,
    engine_weights,
    export_problems,
    refit_problems,
    trtllm_config,
    vocab_shard,
)
from nemo_guide.convert import ModelShape, hf_to_megatron, pipeline_stage, shard_tp, to_te_names
from nemo_guide.convert.nemo_file import nemo_model_config
from trt_reference import engine_graph_logits

QWEN2_HF = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"}


def _shape(qkv_bias=True, vocab=30, tied=False) -> ModelShape:
    return ModelShape(family="qwen2" if qkv_bias else "llama", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                      vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4, rope_llama3_scaling=False,
                      qkv_bias=qkv_bias, tie_word_embeddings=tied)


def _nemo_cfg(qkv_bias=True, tied=False) -> dict:
    shape = _shape(qkv_bias, tied=tied)
    return nemo_model_config(shape, {}, dtype="bfloat16", tokenizer="tok")


def test_qwen2_config_gets_attention_bias_and_llama_does_not():
    qwen = trtllm_config(_nemo_cfg(qkv_bias=True), vocab_size=30, tp_size=2)
    llama = trtllm_config(_nemo_cfg(qkv_bias=False), vocab_size=30, tp_size=2)
    assert qwen["attn_bias"] is True and qwen["mlp_bias"] is False and "bias" not in qwen
    assert llama["attn_bias"] is False
    assert qwen["architecture"] == "LlamaForCausalLM" and qwen["num_key_value_heads"] == 2 and qwen["head_size"] == 8
    assert qwen["tp_size"] == 2 and qwen["world_size"] == 2 and qwen["use_parallel_embedding"] and qwen["hidden_act"] == "silu"
    # a Hugging Face config.json says the same
    assert trtllm_config(QWEN2_HF, vocab_size=30)["attn_bias"] is True
    assert trtllm_config({**QWEN2_HF, "model_type": "llama"}, vocab_size=30)["attn_bias"] is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bias": True}, "model.bias = True"),
        ({"normalization": "layernorm"}, "model.normalization = 'layernorm'"),
        ({"activation": "gelu"}, "model.activation = 'gelu'"),
        ({"position_embedding_type": "learned_absolute"}, "model.position_embedding_type"),
        ({"num_moe_experts": 8}, "model.num_moe_experts = 8"),
        ({"rotary_percentage": 0.5}, "model.rotary_percentage = 0.5"),
        ({"mcore_gpt": False}, "model.mcore_gpt = False"),
    ],
)
def test_a_model_that_cannot_be_exported_faithfully_is_refused_naming_the_field(change, field):
    cfg = {**_nemo_cfg(), **change}
    assert any(field in p for p in export_problems(cfg))
    with pytest.raises(ExportError, match=field.replace("(", r"\(")):
        trtllm_config(cfg, vocab_size=30)


def test_a_partial_model_config_is_checked_on_its_keys_only():
    # a run config whose .nemo is not at hand: absent keys are not problems yet, present ones are
    assert export_problems({"qkv_bias": True, "num_attention_heads": 4, "num_query_groups": 2}, complete=False) == []
    assert any("model.bias = True" in p for p in export_problems({"bias": True}, complete=False))
    assert any("model.share_embeddings_and_output_weights" in p for p in export_problems({**_nemo_cfg(tied=True)}, pp_size=2))


def test_missing_keys_mean_what_nemo_assumes():
    # NeMo's defaults: bias on every linear, LayerNorm, GeLU, learned positions
    problems = " ".join(export_problems({"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "mcore_gpt": True}))
    assert "model.bias = True" in problems and "model.normalization = 'layernorm'" in problems and "model.activation = 'gelu'" in problems
    assert "model.num_query_groups" in " ".join(export_problems(_nemo_cfg(), tp_size=4))  # 2 groups over 4 ranks
    assert export_problems(_nemo_cfg()) == [] and export_problems(_nemo_cfg(), tp_size=2) == []


def _megatron_ranks(hf: dict, shape: ModelShape, tp: int, padded_vocab: int) -> list[dict]:
    """Each TP rank's Megatron state dict as NeMo holds it (``model.`` prefix, TransformerEngine
    names), its vocabulary tensors whole and padded Megatron-style with garbage rows."""
    full = hf_to_megatron(hf, shape)
    pad = torch.randn(padded_vocab - shape.vocab_size, shape.hidden_size)
    vocab = {k: torch.cat([full[k], pad]) for k in ("embedding.word_embeddings.weight", "output_layer.weight") if k in full}
    ranks = []
    for r in range(tp):
        sd = {"model." + k: v for k, v in to_te_names(shard_tp(full, shape, tp, r)).items()}
        sd.update({"model." + k: v for k, v in vocab.items()})
        sd["model.decoder.layers.0.self_attention.core_attention._extra_state"] = None
        ranks.append(sd)
    return ranks


def _hf_qwen2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**{k: v for k, v in QWEN2_HF.items() if k not in ("model_type", "architectures")}, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # random everything, biases large as in real Qwen2 checkpoints
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith("bias") else 0.2) + (1.0 if "norm" in name else 0.0))
    return model


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_weights_have_the_engine_names_shapes_and_the_right_biases(tp):
    torch.manual_seed(0)
    shape = _shape()
    hf = {k: v for k, v in _hf_qwen2().state_dict().items()}
    cfg = trtllm_config(_nemo_cfg(), vocab_size=30, tp_size=tp)
    expected = engine_weight_shapes(cfg)
    assert "transformer.layers.1.attention.qkv.bias" in expected and "transformer.layers.1.attention.dense.bias" in expected
    for r, sd in enumerate(_megatron_ranks(hf, shape, tp, padded_vocab=32)):
        weights = engine_weights(sd, _nemo_cfg(), tp_size=tp, tp_rank=r, vocab_size=30, dtype=torch.float32)
        assert {k: tuple(v.shape) for k, v in weights.items()} == expected
        # rank r holds query heads of groups r*G/tp.., then those groups' key and value heads, then their biases the same way
        qb, kb, vb = (hf[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv")
        q_rows, kv_rows = 32 // tp, 16 // tp
        want = torch.cat([qb[r * q_rows : (r + 1) * q_rows], kb[r * kv_rows : (r + 1) * kv_rows], vb[r * kv_rows : (r + 1) * kv_rows]])
        assert torch.equal(weights["transformer.layers.1.attention.qkv.bias"], want)
        q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
        assert torch.equal(weights["transformer.layers.1.attention.qkv.weight"][:q_rows], q[r * q_rows : (r + 1) * q_rows])
        assert torch.equal(weights["transformer.layers.1.attention.qkv.weight"][q_rows : q_rows + kv_rows], k[r * kv_rows : (r + 1) * kv_rows])
        assert torch.count_nonzero(weights["transformer.layers.0.attention.dense.bias"]) == 0
        # the engine's fc is the activated half (gate_proj), its gate the linear half (up_proj)
        f_rows = 48 // tp
        assert torch.equal(weights["transformer.layers.0.mlp.fc.weight"], hf["model.layers.0.mlp.gate_proj.weight"][r * f_rows : (r + 1) * f_rows])
        assert torch.equal(weights["transformer.layers.0.mlp.gate.weight"], hf["model.layers.0.mlp.up_proj.weight"][r * f_rows : (r + 1) * f_rows])


def test_vocab_shards_drop_megatron_padding_and_zero_pad_the_last():
    full = torch.arange(32.0)[:, None].expand(32, 2)  # 30 real rows + 2 Megatron padding rows
    shards = [vocab_shard(full, 30, 4, r) for r in range(4)]
    assert all(s.shape == (8, 2) for s in shards)
    assert torch.cat(shards)[:30, 0].tolist() == list(range(30)) and torch.cat(shards)[30:].abs().sum() == 0


@pytest.mark.parametrize("tp", [1, 2])
def test_the_engine_graph_on_the_exported_weights_is_the_hf_model_and_without_qkv_bias_it_is_not(tp):
    model = _hf_qwen2()
    hf = dict(model.state_dict())
    tokens = torch.tensor([3, 17, 5, 29, 0, 11, 8, 2])
    with torch.no_grad():
        reference = model(tokens[None]).logits[0].double()  # [T, V]
    cfg = trtllm_config(_nemo_cfg(), vocab_size=30, tp_size=tp)
    ranks = [engine_weights(sd, _nemo_cfg(), tp_size=tp, tp_rank=r, vocab_size=30, dtype=torch.float32)
             for r, sd in enumerate(_megatron_ranks(hf, _shape(), tp, padded_vocab=32))]
    torch.testing.assert_close(engine_graph_logits(ranks, cfg, tokens), reference, rtol=1e-4, atol=1e-4)
    # the stock export: LLaMAConfig without attn_bias, so the engine has no QKV bias
    unfixed = {**cfg, "attn_bias": False}
    gap = (engine_graph_logits(ranks, unfixed, tokens).log_softmax(-1) - reference.log_softmax(-1)).abs()
    assert gap.mean() > 0.1, gap.mean()


def test_refit_problems_name_what_the_engine_lacks():
    cfg = trtllm_config(_nemo_cfg(), vocab_size=30)
    expected = engine_weight_shapes(cfg)
    provided = {k: math.prod(s) for k, s in expected.items()}
    assert refit_problems(provided, provided, expected) == []
    # an engine built by the stock export has no attention biases: refitting into it would drop them
    stock = {k: n for k, n in provided.items() if not k.endswith("bias")}
    problems = refit_problems(provided, stock, expected)
    assert len(problems) == 4 and "the engine has no weight transformer.layers.0.attention.dense.bias" in problems
    assert "the engine has no weight transformer.layers.0.attention.qkv.bias (the engine was built without attention bias: rebuild it with attn_bias" in problems[1]
    assert refit_problems(stock, provided, expected) == [f"{k}: held by the engine but not provided" for k in sorted(set(provided) - set(stock))]
    assert "2 values provided" in refit_problems({**provided, "transformer.ln_f.weight": 2}, provided, expected)[0]


def test_engine_weights_refuse_a_state_dict_that_disagrees_with_the_config():
    shape = _shape()
    sd = _megatron_ranks(dict(_hf_qwen2().state_dict()), shape, 1, padded_vocab=30)[0]
    with pytest.raises(ExportError, match="model.qkv_bias is false"):
        engine_weights(sd, _nemo_cfg(qkv_bias=False), tp_size=1, tp_rank=0, vocab_size=30)
    no_bias = {k: v for k, v in sd.items() if not k.endswith("linear_qkv.bias")}
    with pytest.raises(ExportError, match=r"no 'decoder.layers.0.self_attention.linear_qkv.bias' \(model.qkv_bias = true\)"):
        engine_weights(no_bias, _nemo_cfg(), tp_size=1, tp_rank=0, vocab_size=30)


def test_a_pipeline_parallel_engine_gets_each_stages_layers_and_ends():
    """Engine PP=2 (no reshard): stage 0 holds the embedding and layers 0..L/2-1 numbered from 0, stage 1
    the rest plus the final norm and lm_head; together they still compute the Hugging Face model."""
    model = _hf_qwen2()
    hf = dict(model.state_dict())
    shape, tokens = _shape(), torch.tensor([3, 17, 5, 29, 0, 11])
    cfg = trtllm_config(_nemo_cfg(), vocab_size=30, tp_size=2, pp_size=2)
    full = hf_to_megatron(hf, shape)
    stages = []
    for stage in range(2):
        part = pipeline_stage(full, shape, 2, stage)
        ranks = [engine_weights(shard_tp(part, shape, 2, r) | {k: part[k] for k in ("embedding.word_embeddings.weight", "output_layer.weight") if k in part},
                                _nemo_cfg(), tp_size=2, tp_rank=r, vocab_size=30, dtype=torch.float32, pp_size=2, pp_rank=stage) for r in range(2)]
        assert all({k: tuple(v.shape) for k, v in w.items()} == engine_weight_shapes(cfg, pp_rank=stage) for w in ranks)
        stages.append(ranks)
    assert "transformer.vocab_embedding.weight" in stages[0][0] and "lm_head.weight" not in stages[0][0]
    assert "transformer.ln_f.weight" in stages[1][0] and "transformer.vocab_embedding.weight" not in stages[1][0]
    def shifted(name: str) -> str:  # stage 1's layer i is layer i + 1 of the model (one layer per stage)
        parts = name.split(".")
        return ".".join(parts[:2] + [str(int(parts[2]) + 1)] + parts[3:]) if name.startswith("transformer.layers.") else name

    merged = [{**stages[0][r], **{shifted(k): v for k, v in stages[1][r].items()}} for r in range(2)]
    with torch.no_grad():
        reference = model(tokens[None]).logits[0].double()
    torch.testing.assert_close(engine_graph_logits(merged, {**cfg, "pp_size": 1}, tokens), reference, rtol=1e-4, atol=1e-4)
