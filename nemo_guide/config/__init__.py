"""Run configuration: one frozen dataclass per concern (``sections``), read from YAML (``load``).

``load_config("conf/tiny_cpu.yaml", ["algorithm.group_size=4", ...])`` reads the file,
applies ``key=value`` overrides, maps every section onto its dataclass and validates,
raising one :class:`ConfigError` that names the file and line of every bad value.
"""

from nemo_guide.config.load import config_from_dict, load_config
from nemo_guide.config.sections import (
    SECTIONS,
    AlgorithmConfig,
    BackendConfig,
    Config,
    ConfigError,
    DataConfig,
    GenerationConfig,
    OptimConfig,
    RunConfig,
    choice_fields,
)

__all__ = [
    "SECTIONS",
    "AlgorithmConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "GenerationConfig",
    "OptimConfig",
    "RunConfig",
    "choice_fields",
    "config_from_dict",
    "load_config",
]
