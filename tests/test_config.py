import dataclasses

import pytest

from nemo_guide.config import AlgorithmConfig, Config, ConfigError, config_from_dict, load_config


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert cfg.algorithm.mode == "guide_grpo" and cfg.algorithm.guided_group == "union"
    # shaping is off by default; when on, the quantile is per rollout (Appendix E, the authors' runs)
    assert cfg.algorithm.shaping == "none" and cfg.algorithm.shaping_scope == "rollout"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.algorithm.group_size = 3


def test_load_with_overrides(tmp_path):
    path = _yaml(tmp_path, "algorithm:\n  group_size: 4\n  shaping: percentile\noptim:\n  lr: 3.0e-5\n  betas: [0.9, 0.95]\nrun:\n  steps: 5\n")
    cfg = load_config(path, ["algorithm.group_size=2", "run.name=exp1", "optim.lr=1e-4"])
    assert cfg.algorithm.group_size == 2 and cfg.algorithm.shaping == "percentile"
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.optim.lr, float)
    assert cfg.run.name == "exp1" and cfg.run.steps == 5


def test_all_problems_collected_with_lines_values_and_fixes(tmp_path):
    path = _yaml(tmp_path, "algorithm:\n  clip_low: 1.5\n  shaping: percentil\n  group_sise: 4\ngeneration:\n  temperature: hot\nrunn:\n  steps: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optim.lr=-1"])
    msg = str(info.value)
    assert "6 problem(s)" in msg
    assert f"{path}:2: algorithm.clip_low = 1.5: must be in [0, 1)" in msg
    assert f"{path}:3: algorithm.shaping = 'percentil': unknown value; choose one of 'none', 'percentile', 'constant'" in msg
    assert f"{path}:4: unknown key 'algorithm.group_sise'; did you mean 'algorithm.group_size'?" in msg
    assert f"{path}:6: generation.temperature = 'hot': expected float" in msg
    assert f"{path}:7: unknown section 'runn'; did you mean 'run'?" in msg
    assert "(command line optim.lr=...) optim.lr = -1.0: must be > 0" in msg


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="mini_batch_size"):
        config_from_dict({"optim": {"mini_batch_size": 1000}, "data": {"prompt_batch_size": 2}, "algorithm": {"group_size": 2}})
    with pytest.raises(ConfigError, match="single-process"):
        config_from_dict({"backend": {"tensor_parallel": 2}})


def test_bad_override_syntax_and_yaml(tmp_path):
    path = _yaml(tmp_path, "run:\n  steps: 1\n")
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(path, ["run.steps"])
    bad = _yaml(tmp_path, "run: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_section_validation_direct():
    with pytest.raises(ConfigError, match="group_size = 0"):
        AlgorithmConfig(group_size=0)
    assert AlgorithmConfig(mode="guide_grpo").guided and not AlgorithmConfig(mode="grpo").guided
