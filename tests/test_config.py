import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from nemo_guide.checkpoint import config_differences
from nemo_guide.config import (
    SECTIONS,
    AlgorithmConfig,
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    choice_fields,
    config_from_dict,
    load_config,
)
from nemo_guide.core.guidance import THRESHOLDS, GuidedGroupMode
from nemo_guide.core.kl import KL_ESTIMATORS
from nemo_guide.core.loss import AGGREGATIONS, Shaping, ShapingScope
from nemo_guide.core.mismatch import RolloutCorrection
from nemo_guide.data.templates import STYLES

CONF = Path(__file__).resolve().parents[1] / "conf"
SHIPPED = sorted(CONF.glob("*.yaml"))


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


def test_choice_fields_are_literals_equal_to_the_registries():
    algo, data = choice_fields(AlgorithmConfig), choice_fields(DataConfig)
    # registries: the config accepts exactly the names that have an implementation
    assert set(algo["guidance_threshold"]) == set(THRESHOLDS.names())
    assert set(algo["aggregation"]) == set(AGGREGATIONS.names())
    assert set(algo["kl_estimator"]) == set(KL_ESTIMATORS.names())
    assert set(data["prompt_style"]) == set(STYLES.names())
    # core Enums without a registry
    assert set(algo["guided_group"]) == {m.value for m in GuidedGroupMode}
    assert set(algo["shaping"]) == {m.value for m in Shaping}
    assert set(algo["shaping_scope"]) == {m.value for m in ShapingScope}
    assert set(algo["rollout_correction"]) == {m.value for m in RolloutCorrection}
    # every choice field of every section is declared this one way (no str field checked elsewhere)
    declared = {f"{name}.{field}" for name, cls in SECTIONS.items() for field in choice_fields(cls)}
    assert declared == {
        "algorithm.mode", "algorithm.guidance_threshold", "algorithm.guided_group", "algorithm.old_logprob_context",
        "algorithm.old_logprobs", "algorithm.shaping", "algorithm.shaping_scope", "algorithm.aggregation", "algorithm.kl_estimator",
        "algorithm.rollout_correction", "data.prompt_style", "data.reward", "backend.name", "backend.dtype",
    }


@pytest.mark.parametrize("section,field", [("algorithm", "mode"), ("algorithm", "kl_estimator"), ("data", "prompt_style"), ("backend", "dtype")])
def test_unknown_choice_lists_the_valid_values(section, field):
    choices = choice_fields(SECTIONS[section])[field]
    with pytest.raises(ConfigError) as info:
        SECTIONS[section](**{field: "nonsense"})
    assert info.value.problems == [f"{section}.{field} = 'nonsense': unknown value; choose one of {', '.join(map(repr, choices))}"]
    # the same message through the loader, with a suggestion for a near miss
    with pytest.raises(ConfigError, match=r"algorithm.mode = 'grop': unknown value; choose one of 'grpo', .* \(did you mean 'grpo'\?\)"):
        config_from_dict({"algorithm": {"mode": "grop"}})


def test_saved_configs_compare_equal_on_resume():
    cfg = load_config(CONF / "tiny_cpu.yaml")
    saved = json.loads(json.dumps(cfg.to_dict()))  # what a checkpoint's config.json holds
    assert all(type(v) is str for v in (saved["algorithm"]["mode"], saved["algorithm"]["aggregation"], saved["backend"]["dtype"]))
    assert config_differences(saved, cfg.to_dict()) == []
    # a run saved before data.reward_workers existed used one verifier process
    del saved["data"]["reward_workers"]
    assert config_differences(saved, cfg.to_dict()) == []
    more = load_config(CONF / "tiny_cpu.yaml", ["data.reward_workers=8", "algorithm.aggregation=paper"])
    assert config_differences(saved, more.to_dict()) == ["algorithm.aggregation: 'token-mean' -> 'paper'", "data.reward_workers: 1 -> 8"]


def test_reward_workers():
    assert DataConfig().reward_workers == 1
    assert DataConfig(reward_workers=16).reward_workers == 16
    with pytest.raises(ConfigError, match=r"data.reward_workers = 0: must be >= 1"):
        DataConfig(reward_workers=0)
    with pytest.raises(ConfigError, match=r"data.reward_workers = 'many': expected int"):
        config_from_dict({"data": {"reward_workers": "many"}})


def test_lr_message_agrees_with_the_shipped_tiny_config():
    with pytest.raises(ConfigError) as info:
        OptimConfig(lr=0.0)
    advised = re.search(r"; ([0-9.e-]+) for the tiny CPU policy", str(info.value))
    assert advised and float(advised.group(1)) == load_config(CONF / "tiny_cpu.yaml").optim.lr


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_documents_every_key(path):
    """STYLE 9: a comment line right above every key, and a header with the exact launch command."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert f"#   nemo-guide train conf/{path.name}" in lines, "the header must give the launch command"
    keys = []

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                keys.append((f"{prefix}{key.value}", key.start_mark.line))
                walk(value, f"{prefix}{key.value}.")

    walk(yaml.compose("\n".join(lines)), "")
    assert len(keys) > 6
    undocumented = [f"{name} (line {line + 1})" for name, line in keys if line == 0 or not lines[line - 1].lstrip().startswith("#")]
    assert undocumented == []


def test_unknown_section_from_an_override_is_reported_as_command_line(tmp_path):
    path = _yaml(tmp_path, "run:\n  steps: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["foo.bar=1", "run.stepz=2"])
    msg = str(info.value)
    assert "(command line foo.bar=...) unknown section 'foo'" in msg
    assert "(command line run.stepz=...) unknown key 'run.stepz'" in msg
    assert f"{path}: unknown section" not in msg


def test_a_directory_as_config_names_it_and_a_yaml_file(tmp_path):
    (tmp_path / "b.yaml").write_text("run:\n  steps: 1\n")
    (tmp_path / "a.yaml").write_text("run:\n  steps: 1\n")
    with pytest.raises(IsADirectoryError) as info:
        load_config(tmp_path)
    msg = str(info.value)
    assert "is a directory, not a YAML file" in msg and "does not exist" not in msg
    assert f"e.g. {tmp_path / 'a.yaml'} (a.yaml, b.yaml)" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IsADirectoryError, match="holds no .yaml file"):
        load_config(empty)


def test_a_config_not_in_utf8_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=f"{path}:2: not valid UTF-8 \\(byte 0xe9\\)"):
        load_config(path)


def test_an_override_value_that_is_not_yaml_names_the_override_and_the_quoting(tmp_path):
    path = _yaml(tmp_path, "run:\n  steps: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.hint_template=Hint: {hint} Problem: {problem}"])
    assert "(command line data.hint_template=Hint: {hint} Problem: {problem}) the value is not valid YAML" in str(info.value)
    assert "e.g. \"data.hint_template='Hint: {hint} Problem: {problem}'\"" in str(info.value)
    cfg = load_config(path, ["data.hint_template='Hint: {hint} Problem: {problem}'"])
    assert cfg.data.hint_template == "Hint: {hint} Problem: {problem}"


def test_logprob_chunk_size_is_tokens_or_null_for_the_memory_budget():
    assert config_from_dict({"backend": {"logprob_chunk_size": None}}).backend.logprob_chunk_size is None
    assert config_from_dict({"backend": {"logprob_chunk_size": 256}}).backend.logprob_chunk_size == 256
    with pytest.raises(ConfigError, match=r"backend.logprob_chunk_size = 0: must be >= 1, or null to choose it from a 512 MiB budget"):
        config_from_dict({"backend": {"logprob_chunk_size": 0}})
