"""HF <-> Megatron weight maps and TP/PP splits: hand-computed layouts, bit-exact round
trips, and the sharded layers computing the same function as the full ones."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nemo_guide.convert.errors import ConvertError
from nemo_guide.convert import (
    ModelShape,
    fuse_qkv,
    hf_to_megatron,
    load_hf_state_dict,
    megatron_to_hf,
    merge_pipeline_stages,
    pipeline_stage,
    save_hf_checkpoint,
    shape_from_hf_config,
    shard_tp,
    split_qkv,
    to_te_names,
    unshard_tp,
)


def make_shape(**kw) -> ModelShape:
    base = dict(family="qwen2", num_layers=4, hidden_size=8, ffn_hidden_size=12, num_heads=8, num_kv_heads=4, head_dim=2,
                vocab_size=16, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4, rope_llama3_scaling=False,
                qkv_bias=True, tie_word_embeddings=False)
    base.update(kw)
    return ModelShape(**base)


def random_hf(shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim  # projection rows
    sd = {"model.embed_tokens.weight": r(shape.vocab_size, h), "model.norm.weight": r(h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
            p + "self_attn.q_proj.weight": r(q, h), p + "self_attn.k_proj.weight": r(kv, h),
            p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, q),
            p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h), p + "mlp.down_proj.weight": r(h, f),
        })
        if shape.qkv_bias:
            sd.update({p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv), p + "self_attn.v_proj.bias": r(kv)})
    if not shape.tie_word_embeddings:
        sd["lm_head.weight"] = r(shape.vocab_size, h)
    return sd


def test_fuse_qkv_interleaves_per_query_group_by_hand():
    # 4 query heads, 2 groups, head_dim 1: rows [q0 q1 k0 v0 | q2 q3 k1 v1]
    shape = make_shape(num_heads=4, num_kv_heads=2, head_dim=1)
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = fuse_qkv(q, k, v, shape)
    assert fused.squeeze(-1).tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, shape), (q, k, v), strict=True))
    # biases ([rows]) take the same layout
    assert fuse_qkv(q[:, 0], k[:, 0], v[:, 0], shape).tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("heads,kv", [(8, 4), (8, 8), (8, 1)])
def test_hf_megatron_hf_is_bit_exact(tied, heads, kv):
    shape = make_shape(num_heads=heads, num_kv_heads=kv, tie_word_embeddings=tied, qkv_bias=heads != 8 or kv != 8)
    hf = random_hf(shape)
    mg = hf_to_megatron(hf, shape)
    assert mg["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((heads + 2 * kv) * 2, 8)
    assert ("output_layer.weight" in mg) == (not tied)
    back = megatron_to_hf(mg, shape)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    # the TransformerEngine names map back the same way
    back_te = megatron_to_hf(to_te_names(mg), shape)
    assert all(torch.equal(back_te[k], hf[k]) for k in hf)


def test_missing_tensor_is_named():
    shape = make_shape()
    hf = random_hf(shape)
    del hf["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ConvertError, match="model.layers.2.mlp.up_proj.weight"):
        hf_to_megatron(hf, shape, source="ckpt/")


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_tp_pp_split_and_merge_round_trip(tp, pp, tied):
    shape = make_shape(tie_word_embeddings=tied)
    full = hf_to_megatron(random_hf(shape), shape)
    stages = [pipeline_stage(full, shape, pp, s) for s in range(pp)]
    # stage layers are renumbered from 0; embedding first, norm/output last, tied copy on the last
    assert all(f"decoder.layers.{shape.num_layers // pp - 1}.input_layernorm.weight" in s for s in stages)
    assert "embedding.word_embeddings.weight" in stages[0] and "decoder.final_layernorm.weight" in stages[-1]
    assert ("output_layer.weight" in stages[-1]) == (not tied or pp > 1)
    merged_stages = []
    for stage in stages:
        shards = [shard_tp(stage, shape, tp, r) for r in range(tp)]
        merged_stages.append(unshard_tp(shards))
    merged = merge_pipeline_stages(merged_stages, shape)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)


def test_tp_shards_hold_whole_query_groups_and_gate_up_halves():
    shape = make_shape(num_heads=8, num_kv_heads=4, head_dim=2)
    hf = random_hf(shape)
    full = hf_to_megatron(hf, shape)
    for rank in range(2):
        shard = shard_tp(full, shape, 2, rank)
        # rank r holds query heads 4r..4r+3 and kv heads 2r, 2r+1
        q, k, v = (hf[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
        expected = fuse_qkv(q[8 * rank : 8 * rank + 8], k[4 * rank : 4 * rank + 4], v[4 * rank : 4 * rank + 4], make_shape(num_heads=4, num_kv_heads=2, head_dim=2))
        assert torch.equal(shard["decoder.layers.1.self_attention.linear_qkv.weight"], expected)
        gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
        assert torch.equal(shard["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[6 * rank : 6 * rank + 6], up[6 * rank : 6 * rank + 6]]))
        assert torch.equal(shard["decoder.layers.1.input_layernorm.weight"], full["decoder.layers.1.input_layernorm.weight"])
        assert torch.equal(shard["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][8 * rank : 8 * rank + 8])


@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_mlp_sums_to_the_full_mlp(tp):
    """Column-parallel fc1 with SwiGLU on each shard, row-parallel fc2, partial outputs summed
    (Megatron's all-reduce) equal the unsharded MLP."""
    shape = make_shape(ffn_hidden_size=12, num_heads=6, num_kv_heads=6, vocab_size=24)
    full = hf_to_megatron(random_hf(shape), shape)
    x = torch.randn(5, shape.hidden_size, dtype=torch.float64)

    def mlp(fc1, fc2):
        gate, up = torch.chunk(x @ fc1.double().T, 2, dim=-1)
        return (F.silu(gate) * up) @ fc2.double().T

    key = "decoder.layers.0.mlp.linear_fc{}.weight"
    expected = mlp(full[key.format(1)], full[key.format(2)])
    parts = [shard_tp(full, shape, tp, r) for r in range(tp)]
    got = sum(mlp(p[key.format(1)], p[key.format(2)]) for p in parts)
    torch.testing.assert_close(got, expected)


def test_parallel_sizes_that_do_not_divide_are_named():
    shape = make_shape(num_kv_heads=4, vocab_size=18)
    with pytest.raises(ValueError, match="vocab_size = 18 is not divisible by tensor_model_parallel_size = 4"):
        shape.check_parallel(4, 1)
    with pytest.raises(ValueError, match="num_hidden_layers = 4 is not divisible by pipeline_model_parallel_size = 3"):
        shape.check_parallel(1, 3)


QWEN = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 96, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "tie_word_embeddings": True}


def test_shape_from_configs():
    s = shape_from_hf_config(QWEN)
    assert (s.head_dim, s.qkv_bias, s.tie_word_embeddings, s.rope_theta, s.rope_llama3_scaling) == (16, True, True, 1e6, False)
    llama = {**QWEN, "model_type": "llama", "head_dim": 24, "rope_theta": 5e5, "rope_parameters": None,
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    s = shape_from_hf_config(llama)
    assert (s.head_dim, s.qkv_bias, s.rope_theta, s.rope_llama3_scaling) == (24, False, 5e5, True)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, "differs from Llama 3.1"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "not a multiple"),
])
def test_unsupported_configs_are_refused_by_field(change, match):
    with pytest.raises(ValueError, match=match):
        shape_from_hf_config({**QWEN, **change}, source="m/config.json")


def test_hf_directory_round_trip_sharded_and_refuses_overwrite(tmp_path):
    shape = make_shape()
    hf = random_hf(shape)
    out = save_hf_checkpoint(tmp_path / "out", hf, {"model_type": "qwen2"}, max_shard_bytes=2000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(hf)
    back = load_hf_state_dict(out)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    assert not (tmp_path / "out.tmp").exists()
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        save_hf_checkpoint(tmp_path / "out", hf, {})
