"""The Guide part of a NeMo-Aligner run's Hydra config, validated before any model is built.

A run's YAML is Aligner's (``trainer``, ``model``, ``exp_manager``, ``pretrained_checkpoint``)
plus ``trainer.guide``, which holds this project's sections with the meaning they have in
the embedded backend (``nemo_guide.config``)::

    trainer:
      guide:
        algorithm: {...}     # the same keys as conf/tiny_cpu.yaml's algorithm section
        generation: {...}
        data: {...}
        run: {steps, seed, eval_every, save_every, name, output_dir, log_every}
        mini_batch_size: null   # rollouts per optimizer step (null: the whole step's batch)

The optimizer, precision and layout are NeMo's (``model.optim``, ``trainer.precision``,
``model.tensor_model_parallel_size``...); ``model.micro_batch_size`` is the rollouts per
micro-batch per replica. :func:`guide_config` finds every problem at once and names each
key with its fix. With ``model.ppo.trt_llm.enable`` it also checks the engine's settings
against the Guide sections and the model's exportability, and :class:`ProbeSettings` reads
the engine probe's keys there. This module imports neither NeMo nor torch (the export check,
:func:`nemo_guide.aligner.trt_export.export_problems`, imports torch when the engine is on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from nemo_guide.config import Config, ConfigError, config_from_dict

GUIDE = "trainer.guide"
GUIDE_SECTIONS = ("algorithm", "generation", "data", "run")
GUIDE_KEYS = (*GUIDE_SECTIONS, "mini_batch_size")
NEMO_OWNED = {
    "optim": "the optimizer is NeMo's: set model.optim (name, lr, betas, weight_decay, sched)",
    "backend": "the model is the .nemo checkpoint: set pretrained_checkpoint.restore_from_path and the layout in model.*",
}
RUN_KEYS_IGNORED = ("resume", "keep_checkpoints")
TRT_KEY = "model.ppo.trt_llm"
ENGINE_MAX_INPUT_LEN = ENGINE_MAX_NEW_TOKENS = 1024
"""NeMo-Aligner's defaults for ``model.ppo.trt_llm.max_input_len`` and ``model.ppo.length_params.max_length``."""


@dataclass(frozen=True)
class ProbeSettings:
    """The TensorRT-LLM probe's keys under ``model.ppo.trt_llm`` (what the probe measures, and
    why these default tolerances: :mod:`nemo_guide.aligner.probe`)."""

    enabled: bool = True
    """``probe``: run it (at start-up, and every ``probe_every`` steps)."""
    every: int = 0
    """``probe_every``: steps between probes after the start-up one (0: start-up only)."""
    prompts: int = 8
    """``probe_prompts``: the first N training prompts (plain) form the probe batch."""
    tolerance: float = 0.05
    """``probe_tolerance``: largest mean |engine - trainer| log-prob per token (nats)."""
    max_tolerance: float = 1.5
    """``probe_max_tolerance``: largest single-token |engine - trainer| log-prob (nats)."""
    greedy_tolerance: float = 0.1
    """``probe_greedy_tolerance``: largest fraction of greedy decisions that differ."""

    KEYS = {"probe": "enabled", "probe_every": "every", "probe_prompts": "prompts", "probe_tolerance": "tolerance",
            "probe_max_tolerance": "max_tolerance", "probe_greedy_tolerance": "greedy_tolerance"}

    @classmethod
    def parse(cls, trt: Mapping[str, Any]) -> tuple["ProbeSettings", list[str]]:
        """The settings in a ``model.ppo.trt_llm`` mapping, and every problem with them."""
        values, problems = {}, []
        for key, name in cls.KEYS.items():
            value = trt.get(key)
            if value is None:
                continue
            kind = type(getattr(cls, name))
            fits = isinstance(value, kind) if kind is not float else isinstance(value, (int, float))
            if not fits or (kind is not bool and isinstance(value, bool)):
                problems.append(f"{TRT_KEY}.{key} = {value!r}: expected {kind.__name__}")
                continue
            values[name] = kind(value)
        settings = cls(**values)
        if settings.every < 0:
            problems.append(f"{TRT_KEY}.probe_every = {settings.every}: must be >= 0 (0: at start-up only)")
        if settings.prompts < 1:
            problems.append(f"{TRT_KEY}.probe_prompts = {settings.prompts}: must be >= 1")
        for key in ("probe_tolerance", "probe_max_tolerance", "probe_greedy_tolerance"):
            if not getattr(settings, cls.KEYS[key]) >= 0:
                problems.append(f"{TRT_KEY}.{key} = {getattr(settings, cls.KEYS[key])}: must be >= 0")
        return settings, problems


def probe_settings(cfg: Mapping[str, Any]) -> ProbeSettings | None:
    """The TensorRT-LLM probe's settings of a (validated) plain-container Aligner config; None
    when the engine is off or the probe disabled (``model.ppo.trt_llm.probe = false``)."""
    trt = _get(cfg, TRT_KEY, {}) or {}
    settings = ProbeSettings.parse(trt)[0]
    return settings if trt.get("enable", False) and settings.enabled else None


def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def guide_config(cfg: Mapping[str, Any], *, source: str = "config", complete_model: bool = False) -> Config:
    """The embedded-backend :class:`~nemo_guide.config.Config` that the named steps read, from
    a plain-container Aligner config (``OmegaConf.to_container(cfg, resolve=True)``).
    ``complete_model``: ``cfg["model"]`` holds the ``.nemo``'s whole model config (merged in), so
    a key it lacks means NeMo's default (the TensorRT-LLM export check is then strict).

    Raises:
        ConfigError: every problem, each naming its key (``trainer.guide.*`` or ``model.*``) and the fix.
    """
    problems: list[str] = []
    guide = _get(cfg, GUIDE)
    if not isinstance(guide, Mapping):
        raise ConfigError([f"{GUIDE} is missing: add the Guide sections ({', '.join(GUIDE_KEYS)}); see conf/aligner/tiny_cpu.yaml"], source)
    for key in guide:
        if key in NEMO_OWNED:
            problems.append(f"{GUIDE}.{key}: not a Guide setting here; {NEMO_OWNED[key]}")
        elif key not in GUIDE_KEYS:
            problems.append(f"{GUIDE}.{key}: unknown key; valid keys: {', '.join(GUIDE_KEYS)}")
    for key in RUN_KEYS_IGNORED:
        if key in (guide.get("run") or {}):
            problems.append(f"{GUIDE}.run.{key}: NeMo's exp_manager owns checkpoints here (resume_if_exists, checkpoint_callback_params.save_top_k)")
    micro = _get(cfg, "model.micro_batch_size")
    if not isinstance(micro, int) or micro < 1:
        problems.append(f"model.micro_batch_size = {micro!r}: expected a positive integer (rollouts per micro-batch per replica)")
        micro = 1
    data = {name: dict(guide.get(name) or {}) for name in GUIDE_SECTIONS if name in guide}
    data["optim"] = {"mini_batch_size": guide.get("mini_batch_size"), "micro_batch_size": micro}
    try:
        config = config_from_dict(data)
    except ConfigError as exc:
        problems += [_under_guide(p) for p in exc.problems]
        config = None
    problems += _layout_problems(cfg)
    if config is not None:
        problems += _length_problems(cfg, config) + _engine_problems(cfg, config, complete_model)
    if problems:
        raise ConfigError(problems, source)
    return config


def _under_guide(problem: str) -> str:
    """A problem of the embedded config's sections, with its keys spelled ``trainer.guide.<key>``."""
    for section in (*GUIDE_SECTIONS, "optim"):
        problem = problem.replace(f"'{section}.", f"'{GUIDE}.{section}.")
        if problem.startswith(f"{section}."):
            problem = f"{GUIDE}.{problem}"
    return problem


def _layout_problems(cfg: Mapping[str, Any]) -> list[str]:
    tp = _get(cfg, "model.tensor_model_parallel_size", 1)
    pp = _get(cfg, "model.pipeline_model_parallel_size", 1)
    nodes, devices = _get(cfg, "trainer.num_nodes", 1), _get(cfg, "trainer.devices", 1)
    out = []
    for key, value in (("model.tensor_model_parallel_size", tp), ("model.pipeline_model_parallel_size", pp), ("trainer.num_nodes", nodes), ("trainer.devices", devices)):
        if not isinstance(value, int) or value < 1:
            out.append(f"{key} = {value!r}: expected a positive integer")
    if out:
        return out
    world = nodes * devices
    if world % (tp * pp):
        fits = sorted({d for d in range(1, world + 1) if world % d == 0})
        out.append(
            f"model.tensor_model_parallel_size ({tp}) x model.pipeline_model_parallel_size ({pp}) = {tp * pp} does not divide the world size "
            f"{world} (trainer.num_nodes {nodes} x trainer.devices {devices}); choose TP x PP among {fits}"
        )
    if _get(cfg, "model.ppo.trt_llm.enable", False) and _get(cfg, "model.ppo.trt_llm.reshard", False) and pp > 1:
        out.append("model.ppo.trt_llm.reshard = true with pipeline parallelism: TensorRT-LLM resharding serves PP>1 -> PP=1 only in NeMo 2.1; keep it but note it regroups ranks, or set it false")
    return out


def _length_problems(cfg: Mapping[str, Any], config: Config) -> list[str]:
    """Lengths known without a tokenizer: responses must fit the context and the engine."""
    out = []
    seq = _get(cfg, "model.encoder_seq_length")
    new = config.generation.max_new_tokens
    if isinstance(seq, int) and new >= seq:
        out.append(f"{GUIDE}.generation.max_new_tokens = {new} leaves no room for a prompt in model.encoder_seq_length = {seq}; lower it")
    if _get(cfg, "model.ppo.trt_llm.enable", False):
        max_input = _get(cfg, "model.ppo.trt_llm.max_input_len", ENGINE_MAX_INPUT_LEN)
        if isinstance(max_input, int) and isinstance(seq, int) and max_input + new > seq:
            out.append(
                f"model.ppo.trt_llm.max_input_len ({max_input}) + {GUIDE}.generation.max_new_tokens ({new}) = {max_input + new} exceeds "
                f"model.encoder_seq_length ({seq}); TensorRT-LLM refuses such an engine: lower one of them"
            )
    return out


def prompt_limit(cfg: Mapping[str, Any], config: Config) -> tuple[int, str]:
    """The longest prompt (in tokens) a run can take, and the key that sets it: the smallest of
    ``data.max_prompt_tokens``, TensorRT-LLM's ``max_input_len`` and the context minus the response."""
    limits = [(config.data.max_prompt_tokens, f"{GUIDE}.data.max_prompt_tokens")]
    seq = _get(cfg, "model.encoder_seq_length")
    if isinstance(seq, int):
        limits.append((seq - config.generation.max_new_tokens, f"model.encoder_seq_length - {GUIDE}.generation.max_new_tokens"))
    if _get(cfg, "model.ppo.trt_llm.enable", False) and isinstance(_get(cfg, "model.ppo.trt_llm.max_input_len", ENGINE_MAX_INPUT_LEN), int):
        limits.append((_get(cfg, "model.ppo.trt_llm.max_input_len", ENGINE_MAX_INPUT_LEN), "model.ppo.trt_llm.max_input_len"))
    return min(limits)


def _engine_problems(cfg: Mapping[str, Any], config: Config, complete_model: bool) -> list[str]:
    """The TensorRT-LLM engine's settings against the Guide sections and the model (absent model
    keys count as NeMo's defaults only when ``complete_model``); and
    ``algorithm.rollout_correction``, which needs the sampler's per-token log-probs."""
    trt, gen, algo = _get(cfg, "model.ppo.trt_llm", {}) or {}, config.generation, config.algorithm
    if not trt.get("enable", False):
        if algo.rollout_correction != "none":
            return [f"{GUIDE}.algorithm.rollout_correction = {algo.rollout_correction!r} needs the sampler's per-token log-probs, and "
                    "generation without TensorRT-LLM (Megatron's, through NeMo-Aligner 0.7.0's MegatronGPTActorModel.infer) returns none; "
                    "set model.ppo.trt_llm.enable = true (the Guide engine wrapper requests them) or rollout_correction = none"]
        return []
    from nemo_guide.aligner.trt_export import export_problems  # torch, no NeMo

    _, out = ProbeSettings.parse(trt)
    engine_pp = 1 if trt.get("reshard", False) else _get(cfg, "model.pipeline_model_parallel_size", 1)
    out += export_problems(dict(_get(cfg, "model", {})), tp_size=_get(cfg, "model.tensor_model_parallel_size", 1), pp_size=engine_pp, complete=complete_model)
    if trt.get("model_type", "llama") != "llama":
        out.append(f"model.ppo.trt_llm.model_type = {trt['model_type']!r}: the Guide export builds Llama-architecture engines (Llama, Qwen2); set it to llama")
    length = _get(cfg, "model.ppo.length_params.max_length", ENGINE_MAX_NEW_TOKENS)
    if length != gen.max_new_tokens:
        out.append(f"model.ppo.length_params.max_length = {length} but {GUIDE}.generation.max_new_tokens = {gen.max_new_tokens}: "
                   "the engine's response length is fixed when it is built; make them equal")
    sampling = _get(cfg, "model.ppo.sampling_params", {}) or {}
    engine = {"temperature": sampling.get("temperature", 1.0), "top_p": sampling.get("top_p", 1.0)}
    for key, value in engine.items():
        if value != getattr(gen, key):
            out.append(f"model.ppo.sampling_params.{key} = {value} but {GUIDE}.generation.{key} = {getattr(gen, key)}: the engine's sampling is fixed "
                       "when it is built, and rollouts with other settings would be generated by Megatron instead; make them equal")
    if sampling.get("top_k", 0) not in (0, None) or sampling.get("use_greedy", False):
        out.append(f"model.ppo.sampling_params.top_k = {sampling.get('top_k')} / use_greedy = {sampling.get('use_greedy')}: "
                   "rollouts are sampled from the full distribution at generation.temperature (top_k 0, use_greedy false)")
    return out
