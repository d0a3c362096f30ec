"""The NeMo-Aligner run's config and data checks, before any model is built (no NeMo needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_guide.aligner.config import ProbeSettings, guide_config, probe_settings, prompt_limit
from nemo_guide.config import ConfigError
from nemo_guide.errors import RunError

CONF = Path(__file__).resolve().parents[1] / "conf" / "aligner" / "tiny_cpu.yaml"


def _cfg(**changes):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF), resolve=True)
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def test_the_shipped_config_is_valid_and_means_what_the_embedded_one_means():
    config = guide_config(_cfg())
    assert config.algorithm.mode == "guide_grpo" and config.algorithm.group_size == 8
    assert config.data.prompt_batch_size == 12 and config.optim.micro_batch_size == 32 and config.optim.mini_batch_size is None
    assert prompt_limit(_cfg(), config) == (64, "trainer.guide.data.max_prompt_tokens")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"trainer.guide.algorithm.grup_size": 4}, "trainer.guide.algorithm.grup_size"),
        ({"trainer.guide.algorithm.mode": "ppo"}, "algorithm.mode"),
        ({"trainer.guide.optim": {"lr": 1e-6}}, "set model.optim"),
        ({"trainer.guide.backend": {}}, "pretrained_checkpoint.restore_from_path"),
        ({"trainer.guide.run.resume": True}, "exp_manager"),
        ({"trainer.devices": 6, "model.tensor_model_parallel_size": 4}, "does not divide the world size 6"),
        ({"model.micro_batch_size": 0}, "model.micro_batch_size"),
        ({"trainer.guide.generation.max_new_tokens": 4096, "model.encoder_seq_length": 128}, "leaves no room"),
        ({"model.ppo.trt_llm": {"enable": True, "max_input_len": 100}, "model.encoder_seq_length": 128}, "max_input_len (100)"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(changes, expected):
    with pytest.raises(ConfigError) as err:
        guide_config(_cfg(**changes))
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        guide_config(_cfg(**{"trainer.guide.algorithm.grup_size": 4, "trainer.devices": 3, "model.tensor_model_parallel_size": 2}))
    assert "grup_size" in str(err.value) and "does not divide" in str(err.value)


def _prepare(tmp_path, **changes):
    from nemo_guide.aligner.train import prepare
    from nemo_guide.backends.torch.models import builtin_path

    cfg = OmegaConf.create(_cfg(**changes))
    cfg.model.tokenizer = {"library": "huggingface", "type": str(builtin_path("builtin:tiny-llama"))}
    cfg.pretrained_checkpoint.restore_from_path = None
    cfg.exp_manager.explicit_log_dir = str(tmp_path)
    cfg.model.encoder_seq_length = 128
    return prepare(cfg, source="test")


def test_prompts_are_tokenised_before_any_model_is_built(tmp_path):
    config, train, held_out = _prepare(tmp_path)
    assert len(train.records) > 100 and all(h is not None for h in train.hinted)
    assert held_out is not None and len(held_out.records) == 140
    # the checkpoint's tokenizer: characters map to the built-in policy's ids
    assert train.plain[0].ids[-1] == train.plain[0].text.encode()[-1] - 32 + 4


def test_engine_input_too_short_for_hinted_prompts_is_refused_with_the_record(tmp_path):
    with pytest.raises(RunError, match=r"longer than 12 tokens \(model.ppo.trt_llm.max_input_len\), hinted ones included"):
        _prepare(tmp_path, **{"model.ppo.trt_llm": {"enable": True, "max_input_len": 12}, **EXPORTABLE})


# What the .nemo of a Llama (or, with qkv_bias, a Qwen2) adds to the model section: exportable to TensorRT-LLM.
EXPORTABLE = {f"model.{k}": v for k, v in dict(mcore_gpt=True, bias=False, qkv_bias=True, normalization="rmsnorm", activation="fast-swiglu",
                                                  position_embedding_type="rope", num_attention_heads=4, num_query_groups=2).items()}
ENGINE = {"model.ppo.trt_llm": {"enable": True, "max_input_len": 64}, "model.encoder_seq_length": 256, **EXPORTABLE}


def test_an_engine_run_with_matching_settings_and_the_correction_is_valid():
    config = guide_config(_cfg(**ENGINE, **{"trainer.guide.algorithm.rollout_correction": "tis"}))
    assert config.algorithm.rollout_correction == "tis" and config.algorithm.tis_cap == 2.0
    assert probe_settings(_cfg(**ENGINE)) == ProbeSettings()
    assert probe_settings(_cfg(**{**ENGINE, "model.ppo.trt_llm": {"enable": True, "probe": False}})) is None
    assert probe_settings(_cfg()) is None  # no engine, no probe


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"trainer.guide.algorithm.rollout_correction": "tis", "model.ppo.trt_llm": {"enable": False}},
         "rollout_correction = 'tis' needs the sampler's per-token log-probs, and generation without TensorRT-LLM"),
        ({"model.bias": True}, "model.bias = True: biases on every linear layer"),
        ({"model.normalization": "layernorm"}, "model.normalization = 'layernorm'"),
        ({"model.ppo.length_params.max_length": 32}, "model.ppo.length_params.max_length = 32 but trainer.guide.generation.max_new_tokens = 64"),
        ({"model.ppo.sampling_params.temperature": 0.7}, "model.ppo.sampling_params.temperature = 0.7 but trainer.guide.generation.temperature = 1.0"),
        ({"model.ppo.sampling_params.top_k": 50}, "model.ppo.sampling_params.top_k = 50"),
        ({"model.ppo.trt_llm": {"enable": True, "model_type": "gptnext"}}, "model.ppo.trt_llm.model_type = 'gptnext'"),
        ({"model.ppo.trt_llm": {"enable": True, "probe_every": -2}}, "model.ppo.trt_llm.probe_every = -2"),
        ({"model.pipeline_model_parallel_size": 2, "trainer.devices": 2, "model.share_embeddings_and_output_weights": True},
         "model.share_embeddings_and_output_weights = true with a pipeline-parallel engine"),
        ({"trainer.guide.algorithm.tis_cap": 0.0}, "algorithm.tis_cap = 0.0: must be > 0"),
    ],
)
def test_engine_settings_that_cannot_work_name_the_key(changes, expected):
    with pytest.raises(ConfigError) as err:
        guide_config(_cfg(**{**ENGINE, **changes}))
    assert expected in str(err.value)


def test_absent_model_keys_are_nemos_defaults_only_once_the_nemo_is_merged():
    partial = _cfg(**{"model.ppo.trt_llm": {"enable": True, "max_input_len": 64}, "model.encoder_seq_length": 256, "model.qkv_bias": True})
    guide_config(partial)  # the run config alone: the .nemo holds the architecture
    with pytest.raises(ConfigError, match=r"model.normalization = 'layernorm'"):
        guide_config(partial, complete_model=True)  # prepare() after merging the .nemo's model config


def test_the_engine_input_length_defaults_to_aligners():
    cfg = _cfg(**{**ENGINE, "model.ppo.trt_llm": {"enable": True}, "model.encoder_seq_length": 2048})
    assert prompt_limit(cfg, guide_config(cfg)) == (64, "trainer.guide.data.max_prompt_tokens")
    cfg = _cfg(**{**ENGINE, "model.ppo.trt_llm": {"enable": True}, "model.encoder_seq_length": 1024})
    with pytest.raises(ConfigError, match=r"model.ppo.trt_llm.max_input_len \(1024\) \+ trainer.guide.generation.max_new_tokens \(64\)"):
        guide_config(cfg)


def test_records_without_hints_are_refused_while_guiding(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "problem": f"Q:{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(3)))
    with pytest.raises(RunError, match="has no hint"):
        _prepare(tmp_path, **{"trainer.guide.data.train": str(data)})
