"""The capacity planner: hand-computed tiny cases, published figures, verdicts and fixes, the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nemo_guide.planner.memory import (
    GIB,
    LOGPROB_BLOCK_BYTES,
    Activations,
    Engine,
    Shape,
    activation_bytes,
    engine_bytes,
    fused_logprob_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    model_state_bytes,
    naive_logprob_bytes,
    precision,
    stage_params,
)

# L=2, H=8, F=16 (SwiGLU), 2 heads of 4, 1 KV head, V=32, untied, no biases
TINY = Shape(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=32)


def test_parameters_of_a_tiny_model_by_hand():
    # per layer: q 8x8 + k,v 2x(8x4) + o 8x8 + fc1 8x32 + fc2 16x8 = 64 + 64 + 64 + 256 + 128 = 576 split over TP, norms 2x8 replicated
    assert TINY.layer_params(1) == 592 and TINY.layer_params(2) == 576 / 2 + 16
    # 2 layers + embedding and output 2 x 32x8 + final norm 8
    assert TINY.total_params() == 2 * 592 + 512 + 8 == 1704
    assert stage_params(TINY, 2, 1) == 2 * 304 + 2 * 128 + 8  # TP 2: both embeddings halved
    assert stage_params(TINY, 1, 2) == 592 + 256 + 8  # PP 2: one layer and one embedding per stage


def test_bytes_per_parameter_of_each_optimizer_by_hand():
    # Apex distributed Adam, bf16 O2 (NeMo's default): 2 + 4 + (4 + 4 + 2 remainders) / d
    assert model_state_bytes(1000, precision("distributed_fused_adam", half_params=True), 4) == {"weights": 2000, "gradients": 4000, "optimizer": 2500}
    # fp32 weights: no master copy
    assert model_state_bytes(1000, precision("distributed_fused_adam", half_params=False), 2)["optimizer"] == 4000
    # the replicated optimizer keeps everything: 4 + 4 + 8 bytes
    assert sum(model_state_bytes(1000, precision("adam", half_params=False), 8).values()) == 16000


def test_megatron_distributed_optimizer_table():
    """megatron-core's docs (Distributed Optimizer): 18 bytes per parameter without it, 6 + 12/d
    with it (bf16 parameters, fp32 gradients); 16 and 8 + 8/d with fp32 parameters."""
    for d in (1, 8, 64):
        assert sum(model_state_bytes(1, precision("mcore_distributed_optim", half_params=True), d).values()) == pytest.approx(6 + 12 / d)
        assert sum(model_state_bytes(1, precision("mcore_distributed_optim", half_params=False), d).values()) == pytest.approx(8 + 8 / d)
    assert sum(model_state_bytes(1, precision("fused_adam", half_params=True), 64).values()) == 18
    assert sum(model_state_bytes(1, precision("fused_adam", half_params=False), 64).values()) == 16


def test_zero_paper_figure_1():
    """ZeRO (Rajbhandari et al. 2020), Figure 1: a 7.5B model, 64-way data parallel, mixed-precision
    Adam (K = 12): 120 GB per GPU replicated, 31.4 GB with the optimizer state partitioned (P_os)."""
    psi = 7.5e9
    replicated = model_state_bytes(psi, precision("fused_adam", half_params=True, fp16=True), 64)
    p_os = model_state_bytes(psi, precision("distributed_fused_adam", half_params=True, fp16=True, half_grads=True), 64)
    assert sum(replicated.values()) / 1e9 == pytest.approx(120.0)
    assert sum(p_os.values()) / 1e9 == pytest.approx(31.4, abs=0.05)


GPT3 = Shape(num_layers=96, hidden_size=12288, ffn_hidden_size=4 * 12288, num_heads=96, num_kv_heads=96, head_dim=128, vocab_size=51200,
             gated=False, hidden_dropout=0.1, attention_dropout=0.1)


@pytest.mark.parametrize(
    ("tp", "sp", "recompute", "expected"),
    [
        (1, False, None, lambda s, b, h, a, t: s * b * h * (34 + 5 * a * s / h)),  # Korthikanti Eq. 1
        (8, False, None, lambda s, b, h, a, t: s * b * h * (10 + 24 / t + 5 * a * s / (h * t))),  # Eq. 2 (tensor parallel)
        (8, True, None, lambda s, b, h, a, t: s * b * h / t * (34 + 5 * a * s / h)),  # Eq. 4 (+ sequence parallel)
        (8, True, "selective", lambda s, b, h, a, t: 34 * s * b * h / t),  # Eq. 6 (+ selective recompute)
    ],
)
def test_korthikanti_activation_formulas(tp, sp, recompute, expected):
    """Korthikanti et al. 2022 for GPT-3 175B (s 2048, b 1, h 12288, a 96): the per-stored-tensor
    count reduces to the paper's per-layer formulas for GPT (GeLU, 4h MLP, dropout, no flash)."""
    a = Activations(micro_batch=1, seq_len=2048, tp=tp, sequence_parallel=sp, flash=False, recompute=recompute)
    assert layer_activation_bytes(GPT3, a) == pytest.approx(expected(2048, 1, 12288, 96, tp))


def test_pipeline_and_full_recompute_by_hand():
    a = Activations(micro_batch=1, seq_len=16, tp=1, flash=True)
    per_layer = layer_activation_bytes(TINY, a)
    # per token: 2 B x (4H + q + 2kv + attn out + 2F + F) = 2 x (32 + 8 + 8 + 8 + 32 + 16) = 208 B
    assert per_layer == 16 * 208
    assert activation_bytes(TINY, a, pp=1, micro_batches=4) == 2 * per_layer  # one micro-batch at a time
    assert activation_bytes(TINY, a, pp=2, micro_batches=4) == 1 * per_layer * 2  # 1F1B: 2 in flight on stage 1
    full = Activations(micro_batch=1, seq_len=16, tp=1, flash=True, recompute="full")
    assert activation_bytes(TINY, full, pp=1, micro_batches=4) == 2 * (2 * 16 * 8) + per_layer  # inputs + one recomputed layer


def test_log_prob_peaks_by_hand():
    # fused: 3 fp32 copies of [V/t, H] + one [min(C, T), V/t] fp32 chunk + T x H x (2 + 4)
    assert fused_logprob_bytes(TINY, tp=2, chunk=4, response_tokens=10, half_params=True) == 3 * 16 * 8 * 4 + 4 * 16 * 4 + 10 * 8 * 6
    # with the entropy, one row block more: at most the chunk here (4 rows); at V/t = 151936 in
    # fp32 (607,744 bytes a row) 32 MiB blocks are 55 rows, 56 with a merged remainder
    assert fused_logprob_bytes(TINY, tp=2, chunk=4, response_tokens=10, half_params=True, with_entropy=True) == 3 * 16 * 8 * 4 + (4 + 4) * 16 * 4 + 10 * 8 * 6
    big = dataclasses.replace(TINY, vocab_size=2 * 151936)
    extra = fused_logprob_bytes(big, tp=2, chunk=1024, response_tokens=2048, half_params=False, with_entropy=True) - fused_logprob_bytes(
        big, tp=2, chunk=1024, response_tokens=2048, half_params=False)
    assert extra == 56 * 151936 * 4
    from nemo_guide.kernels.chunking import BLOCK_BYTES

    assert LOGPROB_BLOCK_BYTES == BLOCK_BYTES  # the planner counts the kernel's block
    # naive: 14 bytes per [b, s, V/t] element
    assert naive_logprob_bytes(TINY, tp=2, micro_batch=3, seq_len=5) == 14 * 3 * 5 * 16


def test_kv_cache_formula_and_the_published_llama2_7b_figure():
    """NVIDIA's "Mastering LLM Techniques: Inference Optimization": Llama 2 7B in 16-bit, batch 1,
    4096 tokens: 1 x 4096 x 2 x 32 x 4096 x 2 bytes, about 2 GB."""
    llama2 = Shape(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_heads=32, num_kv_heads=32, head_dim=128, vocab_size=32000)
    assert kv_cache_bytes(llama2, tp=1, layers=32, batch=1, tokens=4096) == 1 * 4096 * 2 * 32 * 4096 * 2 == 2 * GIB
    # GQA over TP: 1 KV head per rank even when TP exceeds the KV heads (TensorRT-LLM replicates them)
    assert kv_cache_bytes(TINY, tp=2, layers=2, batch=3, tokens=10) == 2 * 2 * 1 * 4 * 2 * 3 * 10


def test_engine_terms_follow_reshard():
    engine = Engine(enabled=True, max_batch=2, max_input_len=6, max_output_len=4, reshard=False)
    per_stage = engine_bytes(TINY, engine, tp=1, pp=2)
    resharded = engine_bytes(TINY, Engine(True, 2, 6, 4, reshard=True), tp=1, pp=2)
    assert per_stage["engine_weights"] == 2 * stage_params(TINY, 1, 2) and resharded["engine_weights"] == 2 * stage_params(TINY, 1, 1)
    assert resharded["kv_cache"] == 2 * per_stage["kv_cache"]  # all layers on every GPU
    megatron = engine_bytes(TINY, Engine(False, 2, 6, 4), tp=1, pp=1)
    assert megatron["engine_weights"] == 0 and megatron["kv_cache"] > 0


@pytest.mark.parametrize(
    ("name", "shape", "card"),
    [
        ("Qwen2.5-7B / Qwen2.5-Math-7B", Shape(28, 3584, 18944, 28, 4, 128, 152064, qkv_bias=True), 7.61e9),
        ("Qwen2.5-72B", Shape(80, 8192, 29568, 64, 8, 128, 152064, qkv_bias=True), 72.7e9),
        ("Llama-3.1-8B", Shape(32, 4096, 14336, 32, 8, 128, 128256), 8.03e9),
    ],
)
def test_parameter_counts_match_the_model_cards(name, shape, card):
    assert shape.total_params() == pytest.approx(card, rel=1e-3), name


def test_qwen2_5_32b_count_is_what_its_config_implies():
    """Its card says 32.5B; config.json (intermediate 27648) implies 32,763,876,352 weights."""
    assert Shape(64, 5120, 27648, 40, 8, 128, 152064, qkv_bias=True).total_params() == 32_763_876_352


# -- whole plans from configs ---------------------------------------------------------------


def _cfg(**model):
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "conf" / "aligner" / "qwen2_5_math_7b.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg["model"].update(model)
    return cfg


def test_a_plan_that_does_not_fit_names_the_term_and_a_fix_that_fits():
    from nemo_guide.planner import plan_config, verdict

    plan, fix = plan_config(_cfg(micro_batch_size=8))
    assert not plan.fits and plan.largest_term == "activations"
    assert fix is not None and fix.fits and fix.overrides[0] == "model.activations_checkpoint_granularity=full"
    assert "largest term activations" in verdict(plan, fix) and "fix: model.activations_checkpoint_granularity=full" in verdict(plan, fix)


def test_a_fix_is_verified_by_replanning():
    from nemo_guide.planner import plan_config, verdict

    plan, fix = plan_config(_cfg(), gpus_per_node=2, gpu_memory_gib=40)  # TP 2 on 2 GPUs: no data parallelism
    assert not plan.fits and fix is not None and fix.plan.peak < plan.peak
    assert ("fix: " in verdict(plan, fix)) == fix.fits


def test_layout_errors_stop_the_plan():
    """4 KV heads cannot split over TP=8: the config check (which the planner runs first, exit 2
    in `nemo-guide plan`) names the key before any memory is estimated."""
    from nemo_guide.config import ConfigError
    from nemo_guide.planner import plan_config

    with pytest.raises(ConfigError, match="num_query_groups"):
        plan_config(_cfg(tensor_model_parallel_size=8))


def test_shape_from_the_nemo_and_disagreement_refused(tmp_path):
    import tarfile

    import yaml

    from nemo_guide.convert.nemo_file import MODEL_CONFIG
    from nemo_guide.errors import RunError
    from nemo_guide.planner import plan_config

    nemo_cfg = {k: v for k, v in _cfg()["model"].items() if k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                                                  "num_query_groups", "kv_channels", "override_vocab_size", "qkv_bias")}
    (tmp_path / MODEL_CONFIG).write_text(yaml.safe_dump(nemo_cfg))
    with tarfile.open(tmp_path / "m.nemo", "w") as tar:
        tar.add(tmp_path / MODEL_CONFIG, arcname=f"./{MODEL_CONFIG}")
    cfg = _cfg()
    cfg["pretrained_checkpoint"]["restore_from_path"] = str(tmp_path / "m.nemo")
    for key in nemo_cfg:
        del cfg["model"][key]
    plan, _ = plan_config(cfg)  # the shape comes from the .nemo alone
    assert plan.inputs.shape.hidden_size == 3584
    cfg["model"]["hidden_size"] = 4096
    with pytest.raises(RunError, match="hidden_size = 4096"):
        plan_config(cfg)


def test_cli_plan_text_json_and_exit_codes(capsys):
    from nemo_guide.cli import main

    path = "conf/aligner/qwen2_5_math_7b.yaml"
    assert main(["plan", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["layout"]["dp"] == 4 and set(out["terms_gib"]) >= {"weights", "gradients", "optimizer", "activations", "logprobs", "kv_cache"}
    assert out["phases_gib"]["training"]["total"] == out["peak_gib"] and out["fix"] is None
    assert main(["plan", path, "model.micro_batch_size=8", "--gpu-memory", "80"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", path, "--nodes", "1", "--gpus-per-node", "3"]) == 2  # TP 2 does not divide 3 GPUs
    assert "does not divide" in capsys.readouterr().err
