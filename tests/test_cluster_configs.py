"""The shipped cluster configs (conf/aligner/*.yaml but the CPU one): valid, planned to fit 80 GB
GPUs, their header arithmetic equal to the planner's, their architecture equal to what
`nemo-guide convert hf-to-nemo` writes for the model's published config.json, and every field commented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_guide.aligner.config import guide_config
from nemo_guide.convert.nemo_file import nemo_model_config
from nemo_guide.convert.shape import shape_from_hf_config
from nemo_guide.planner import plan_config, plan_json

CONF = Path(__file__).resolve().parents[1] / "conf" / "aligner"
CLUSTER = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "tiny_cpu")

# The architecture fields of each model's published config.json (Hugging Face).
HF = {
    "qwen2_5_math_7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2_5_32b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen2_5_72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
    "llama3_1_8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
}
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "override_vocab_size", "share_embeddings_and_output_weights", "qkv_bias", "bias", "activation")


def _load(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)


def test_there_are_the_four_cluster_configs():
    assert CLUSTER == ["llama3_1_8b", "qwen2_5_32b", "qwen2_5_72b", "qwen2_5_math_7b"]


@pytest.mark.parametrize("name", CLUSTER)
def test_config_is_valid_and_fits_80gb(name):
    cfg = _load(name)
    config = guide_config(cfg)
    assert config.algorithm.group_size == 8 and config.algorithm.kl_coef == 0 and config.generation.max_new_tokens == 3072
    assert cfg["model"]["optim"]["lr"] == 1e-6
    plan, fix = plan_config(cfg)
    assert plan.fits and fix is None and not plan.problems
    assert cfg["exp_manager"]["checkpoint_callback_params"]["model_parallel_size"] == cfg["model"]["tensor_model_parallel_size"] * cfg["model"]["pipeline_model_parallel_size"]
    assert cfg["model"]["ppo"]["length_params"]["max_length"] == config.generation.max_new_tokens


@pytest.mark.parametrize("name", [*CLUSTER, "tiny_cpu"])
def test_nemo_guide_config_accepts_it(name, capsys):
    from nemo_guide.cli import main

    assert main(["config", str(CONF / f"{name}.yaml")]) == 0
    assert '"trainer.guide"' in capsys.readouterr().out


def test_nemo_guide_config_reports_a_bad_layout(capsys):
    from nemo_guide.cli import main

    assert main(["config", str(CONF / "qwen2_5_72b.yaml"), "trainer.devices=5"]) == 2
    assert "does not divide the world size 40" in capsys.readouterr().err


@pytest.mark.parametrize("name", CLUSTER)
def test_header_arithmetic_is_the_planners(name):
    text = (CONF / f"{name}.yaml").read_text()
    documented = {m[0]: float(m[1]) for m in re.findall(r"^#\s+([a-z_]+)\s+([\d.]+) = ", text, re.M)}
    peak = re.search(r"^#\s+peak\s+([\d.]+) in the (\w+) phase", text, re.M)
    plan = plan_json(*plan_config(_load(name)))
    assert len(documented) == 9 and peak is not None
    for term, value in documented.items():
        assert plan["terms_gib"][term] == pytest.approx(value, abs=0.01), term
    assert (float(peak[1]), peak[2]) == (pytest.approx(plan["peak_gib"], abs=0.01), plan["peak_phase"])
    assert f"--config-name {name}" in text and f"nemo-guide plan conf/aligner/{name}.yaml" in text


@pytest.mark.parametrize("name", CLUSTER)
def test_architecture_is_what_hf_to_nemo_writes(name):
    written = nemo_model_config(shape_from_hf_config(HF[name]), HF[name], dtype="bfloat16", tokenizer="t")
    model = _load(name)["model"]
    for key in SHAPE_KEYS:
        assert model[key] == written[key], key


@pytest.mark.parametrize("name", CLUSTER)
def test_every_field_has_a_comment_above_it(name):
    lines = (CONF / f"{name}.yaml").read_text().splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line == "trainer:") + 1 :]
    for i, line in enumerate(body):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # comments and section headers
        assert body[i - 1].strip().startswith("#") or body[i - 1].strip().endswith(":") and body[i - 2].strip().startswith("#"), f"{name}: {line!r} has no comment"
