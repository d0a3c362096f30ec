"""The config sections: one frozen dataclass per concern, each validating itself.

Every field with a fixed set of values is declared one way: a ``Literal`` of plain strings
(the aliases below), checked for every section by :meth:`_Section.choice_problems`, whose
error lists the valid values. Values stay plain ``str``, so a config saved by any run
(``config.json``) compares equal to a loaded one. Where a value names a registered
implementation (guidance thresholds, loss aggregations, KL estimators, prompt styles) or a
member of a core ``str`` Enum, the ``Literal`` lists exactly the Enum's values; a test keeps
the two equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` holds one line per bad value."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        head = f"invalid configuration{f' in {source}' if source else ''} ({len(problems)} problem(s)):"
        super().__init__(head + "\n  " + "\n  ".join(self.problems))


# -- the choice fields: each a Literal of plain strings ----------------------------------------

Mode = Literal["grpo", "filter_grpo", "guide_grpo", "sft"]
OldLogprobContext = Literal["sampling", "plain"]
OldLogprobsName = Literal["reuse", "recompute"]
GuidanceThresholdName = Literal["all_incorrect", "mostly_incorrect", "always", "never"]
"""The values of :class:`nemo_guide.core.guidance.GuidanceThreshold` (its registry's keys)."""
GuidedGroupName = Literal["union", "replace"]
"""The values of :class:`nemo_guide.core.guidance.GuidedGroupMode`."""
ShapingName = Literal["none", "percentile", "constant"]
"""The values of :class:`nemo_guide.core.loss.Shaping`."""
ShapingScopeName = Literal["batch", "rollout"]
"""The values of :class:`nemo_guide.core.loss.ShapingScope`."""
AggregationName = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "paper"]
"""The values of :class:`nemo_guide.core.loss.Aggregation` (its registry's keys)."""
KLEstimatorName = Literal["k1", "k2", "k3"]
"""The values of :class:`nemo_guide.core.kl.KLEstimator` (its registry's keys)."""
RolloutCorrectionName = Literal["none", "tis"]  # the values of nemo_guide.core.mismatch.RolloutCorrection
PromptStyleName = Literal["plain", "think_answer", "chat"]
"""The values of :class:`nemo_guide.data.templates.PromptStyle` (its registry's keys)."""
RewardName = Literal["auto", "math", "exact"]
Backend = Literal["torch", "megatron"]
DType = Literal["float32", "bfloat16", "float16"]


@functools.cache
def choice_fields(cls: type) -> dict[str, tuple[str, ...]]:
    """``{field name: valid values}`` for every ``Literal`` field of a section dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in fields(cls) if get_origin(hints[f.name]) is Literal}


class _Section:
    """Base of the section dataclasses: ``__post_init__`` raises every problem at once.

    The problems are those of the choice fields (a value outside its ``Literal``), then the
    section's own ``check()``.
    """

    SECTION = ""

    def check(self) -> list[str]:
        return []

    def choice_problems(self) -> list[str]:
        problems = []
        for name, choices in choice_fields(type(self)).items():
            value = getattr(self, name)
            if value not in choices:
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{self.SECTION}.{name} = {value!r}: unknown value; choose one of {', '.join(map(repr, choices))}{hint}")
        return problems

    def __post_init__(self) -> None:
        problems = self.choice_problems() + self.check()
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class AlgorithmConfig(_Section):
    SECTION = "algorithm"

    mode: Mode = "guide_grpo"
    """``grpo``; ``filter_grpo`` (drop groups whose rewards are all equal, DAPO-style); ``guide_grpo`` (Algorithm 1); ``sft`` (the paper's baseline on reference solutions)."""
    group_size: int = 8
    """k: rollouts per prompt, and guided rollouts per guided prompt."""
    guidance_threshold: GuidanceThresholdName = "all_incorrect"
    """When a prompt is guided (``guide_grpo``): all_incorrect | mostly_incorrect | always | never."""
    guided_group: GuidedGroupName = "union"
    """``union``: guided rollouts join the failed plain ones in one group (paper Eq. 6).
    ``replace``: they replace the failed group (the authors' guide_rl code)."""
    old_logprob_context: OldLogprobContext = "sampling"
    """Denominator of a guided token's ratio: ``sampling`` = pi_old on the hinted prompt (paper Eq. 6); ``plain`` = pi_old on the
    plain prompt (Appendix D's unstable variant, which learns where the hint supplies steps the plain policy gives ~0 probability)."""
    old_logprobs: OldLogprobsName = "reuse"
    """``reuse``: an on-policy update (``ppo_epochs = 1``, one mini-batch) takes pi_old (and its entropy) of the trained rollouts whose pi_old context is the plain prompt from its own forward, detached (nemo_guide/on_policy.py); ``recompute``: a forward of their own before the update for every rollout (as off-policy updates and ``rollout_correction=tis`` on the sampling prompt always do)."""
    clip_low: float = 0.2
    """PPO clip: ratios below 1 - clip_low are clipped (plain tokens)."""
    clip_high: float = 0.2
    """PPO clip: ratios above 1 + clip_high are clipped (plain tokens)."""
    clip_guided: bool = False
    """Clip guided tokens too (the paper found this unstable; Appendix D)."""
    shaping: ShapingName = "none"
    """Guided-ratio reshaping: none | percentile (Appendix E, guide_rl) | constant (LUFFY)."""
    shaping_gamma: float = 0.9
    """percentile: the quantile of guided ratios used as gamma; constant: gamma itself."""
    shaping_scope: ShapingScopeName = "rollout"
    """percentile: where the quantile is taken. ``rollout``: one per guided rollout, over its counted tokens (paper Appendix E; also
    what the authors' runs did in effect: guide_rl takes one quantile per micro-batch and its scripts train with micro-batch size 1).
    ``batch``: one over all guided tokens of a micro-batch (``optim.micro_batch_size`` rollouts), a variant the authors never ran
    (their loss cannot take a micro-batch > 1 with its per-rollout guided mask)."""
    aggregation: AggregationName = "token-mean"
    """Loss reduction: token-mean | seq-mean-token-mean | seq-mean-token-sum | paper (Eq. 6)."""
    normalize_std: bool = True
    """Divide advantages by the group's standard deviation (False: Dr. GRPO, mean only)."""
    kl_coef: float = 0.0
    """Weight of KL(pi_theta || pi_ref) on the plain prompt (paper: 0)."""
    kl_estimator: KLEstimatorName = "k3"
    """k1 | k2 | k3."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (paper: 0)."""
    ppo_epochs: int = 1
    """mu in Algorithm 1: update passes over each rollout batch."""
    rollout_correction: RolloutCorrectionName = "none"
    """Sampler/trainer mismatch correction: ``none`` (paper) or ``tis``, token losses times ``min(pi_old(sampling prompt) / pi_sampler, tis_cap)`` (needs the sampler's log-probs; README)."""
    tis_cap: float = 2.0
    """``rollout_correction=tis``: the truncation C of the importance weights (Yao et al. use 2)."""

    def check(self) -> list[str]:
        p: list[str] = []
        s = self.SECTION
        if self.group_size < 1:
            p.append(f"{s}.group_size = {self.group_size}: must be >= 1 (the paper uses 8)")
        elif self.group_size < 2 and self.mode != "sft":
            p.append(f"{s}.group_size = {self.group_size}: group-relative advantages need >= 2 rollouts per prompt")
        for name in ("clip_low", "clip_high"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                p.append(f"{s}.{name} = {v}: must be in [0, 1) (the paper uses 0.2)")
        if self.shaping == "percentile" and not 0 <= self.shaping_gamma <= 1:
            p.append(f"{s}.shaping_gamma = {self.shaping_gamma}: with shaping=percentile it is a quantile in [0, 1] (e.g. 0.9)")
        if self.shaping == "constant" and self.shaping_gamma <= 0:
            p.append(f"{s}.shaping_gamma = {self.shaping_gamma}: with shaping=constant it must be > 0 (LUFFY uses 0.1)")
        if self.kl_coef < 0:
            p.append(f"{s}.kl_coef = {self.kl_coef}: must be >= 0")
        if self.ppo_epochs < 1:
            p.append(f"{s}.ppo_epochs = {self.ppo_epochs}: must be >= 1")
        if not self.tis_cap > 0:
            p.append(f"{s}.tis_cap = {self.tis_cap}: must be > 0 (2 is the usual truncation)")
        return p

    @property
    def guided(self) -> bool:
        """Whether this run samples guided rollouts."""
        return self.mode == "guide_grpo" and self.guidance_threshold != "never"


@dataclass(frozen=True)
class GenerationConfig(_Section):
    SECTION = "generation"

    max_new_tokens: int = 256
    """Response length limit L; a rollout that hits it without EOS is truncated."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    eval_temperature: float = 0.0
    """Temperature of held-out evaluation; 0 = greedy (the paper's pass@1)."""

    def check(self) -> list[str]:
        p: list[str] = []
        s = self.SECTION
        if self.max_new_tokens < 1:
            p.append(f"{s}.max_new_tokens = {self.max_new_tokens}: must be >= 1")
        if self.temperature <= 0:
            p.append(f"{s}.temperature = {self.temperature}: must be > 0 for sampling rollouts (1.0 in the paper)")
        if not 0 < self.top_p <= 1:
            p.append(f"{s}.top_p = {self.top_p}: must be in (0, 1]")
        if self.eval_temperature < 0:
            p.append(f"{s}.eval_temperature = {self.eval_temperature}: must be >= 0 (0 = greedy)")
        return p


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION = "data"

    train: str = "builtin:digit_ops"
    """Training records: a .jsonl/.parquet path, or ``builtin:<task>`` for a synthetic task."""
    eval: str | None = None
    """Held-out records (same forms); None: the built-in task's held-out split, else no eval."""
    prompt_batch_size: int = 8
    """B: prompts per step."""
    prompt_style: PromptStyleName = "plain"
    """plain | think_answer (Appendix H) | chat (Appendix I system prompt + tokenizer template)."""
    hint_template: str | None = None
    """Guided-prompt template with {problem} and {hint}; None: Appendix G's."""
    system_prompt: str | None = None
    """chat style only: replaces Appendix I's system prompt ("" for none)."""
    max_prompt_tokens: int = 1024
    """Longest prompt (hinted prompts included); longer ones are an error, never cut."""
    eval_limit: int | None = None
    """Evaluate on the first N held-out records only (None: all)."""
    reward: RewardName = "auto"
    """Verifier: ``math`` (math-verify on the last \\boxed{} or <answer>), ``exact`` (text after the
    last ``A:``), ``auto`` (exact for builtin: tasks, else math)."""
    reward_workers: int = 1
    """Verifier processes of the math reward (each ~100 MB; checks of a step run in parallel).
    One worker checks a step's completions one after another and bottlenecks real runs
    (thousands of completions a step): use about one per CPU core the trainer leaves free on
    each node, e.g. 8-16 on a GPU node. The exact reward runs in-process and ignores it."""

    def check(self) -> list[str]:
        p: list[str] = []
        s = self.SECTION
        if not self.train:
            p.append(f"{s}.train is empty: give a .jsonl/.parquet path or builtin:digit_ops")
        if self.prompt_batch_size < 1:
            p.append(f"{s}.prompt_batch_size = {self.prompt_batch_size}: must be >= 1")
        if self.hint_template is not None:
            for name in ("problem", "hint"):
                if self.hint_template.count("{" + name + "}") != 1:
                    p.append(f"{s}.hint_template must contain {{{name}}} exactly once: {self.hint_template[:80]!r}")
        if self.max_prompt_tokens < 1:
            p.append(f"{s}.max_prompt_tokens = {self.max_prompt_tokens}: must be >= 1")
        if self.reward_workers < 1:
            p.append(f"{s}.reward_workers = {self.reward_workers}: must be >= 1 (verifier processes; e.g. 8-16 per GPU node)")
        if self.eval_limit is not None and self.eval_limit < 1:
            p.append(f"{s}.eval_limit = {self.eval_limit}: must be >= 1 or null")
        return p


@dataclass(frozen=True)
class OptimConfig(_Section):
    SECTION = "optim"

    lr: float = 1e-6
    """AdamW learning rate (paper: 1e-6 at 7B)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    mini_batch_size: int | None = None
    """Rollouts per optimizer step (None: the whole rollout batch, one step per epoch)."""
    micro_batch_size: int = 16
    """Rollouts per forward/backward; gradients accumulate up to a mini-batch."""

    def check(self) -> list[str]:
        p: list[str] = []
        s = self.SECTION
        if self.lr <= 0:
            p.append(f"{s}.lr = {self.lr}: must be > 0 (1e-6 at 7B; 3e-4 for the tiny CPU policy, as conf/tiny_cpu.yaml ships)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            p.append(f"{s}.betas = {list(self.betas)}: must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.weight_decay < 0:
            p.append(f"{s}.weight_decay = {self.weight_decay}: must be >= 0")
        if self.grad_clip < 0:
            p.append(f"{s}.grad_clip = {self.grad_clip}: must be >= 0 (0 = off)")
        if self.warmup_steps < 0:
            p.append(f"{s}.warmup_steps = {self.warmup_steps}: must be >= 0")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            p.append(f"{s}.mini_batch_size = {self.mini_batch_size}: must be >= 1 or null")
        if self.micro_batch_size < 1:
            p.append(f"{s}.micro_batch_size = {self.micro_batch_size}: must be >= 1")
        return p


@dataclass(frozen=True)
class BackendConfig(_Section):
    SECTION = "backend"

    name: Backend = "torch"
    """torch (embedded: one process, CPU or one GPU) | megatron (TP/PP, NeMo-Aligner)."""
    model: str = "builtin:tiny"
    """A Hugging Face model directory, or builtin:tiny (the small built-in decoder)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: DType = "float32"
    """Parameter dtype for training (float32 on CPU)."""
    tensor_parallel: int = 1
    """Megatron tensor-parallel size."""
    pipeline_parallel: int = 1
    """Megatron pipeline-parallel size."""
    logprob_chunk_size: int | None = 1024
    """Tokens per chunk when computing log-probs (bounds the [chunk, V] logits held); null: chosen
    per call from a 512 MiB budget (fused_logprobs' chunk_for_budget; 771 tokens at V=151936)."""

    def check(self) -> list[str]:
        p: list[str] = []
        s = self.SECTION
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            p.append(f"{s}.device = {self.device!r}: choose auto, cpu, cuda or cuda:N")
        for name in ("tensor_parallel", "pipeline_parallel"):
            v = getattr(self, name)
            if v < 1:
                p.append(f"{s}.{name} = {v}: must be >= 1")
            elif v > 1 and self.name == "torch":
                p.append(f"{s}.{name} = {v}: the torch backend is single-process; set backend.name=megatron or {name}=1")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 1:
            p.append(f"{s}.logprob_chunk_size = {self.logprob_chunk_size}: must be >= 1, or null to choose it from a 512 MiB budget")
        return p


@dataclass(frozen=True)
class RunConfig(_Section):
    SECTION = "run"

    name: str = "run"
    """Run name: outputs go to <output_dir>/<name>/."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    steps: int = 100
    """Training steps (one prompt batch each)."""
    seed: int = 0
    """Seeds data order, sampling and initialisation."""
    eval_every: int = 0
    """Evaluate on held-out problems every N steps (0 = only before and after training)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    resume: bool = False
    """Continue from the latest checkpoint in the run directory."""
    log_every: int = 1
    """Write metrics every N steps."""

    def check(self) -> list[str]:
        p: list[str] = []
        s = self.SECTION
        if not self.name or "/" in self.name or self.name in (".", ".."):
            p.append(f"{s}.name = {self.name!r}: must be a plain directory name")
        if self.steps < 0:
            p.append(f"{s}.steps = {self.steps}: must be >= 0")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                p.append(f"{s}.{name} = {getattr(self, name)}: must be >= 0 (0 = off)")
        if self.keep_checkpoints < 1:
            p.append(f"{s}.keep_checkpoints = {self.keep_checkpoints}: must be >= 1")
        if self.log_every < 1:
            p.append(f"{s}.log_every = {self.log_every}: must be >= 1")
        return p

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> list[str]:
        """Problems that involve more than one section."""
        p: list[str] = []
        a, o, d = self.algorithm, self.optim, self.data
        rollouts = d.prompt_batch_size * a.group_size
        if o.mini_batch_size is not None and o.mini_batch_size > rollouts * (2 if a.guided else 1):
            p.append(
                f"optim.mini_batch_size = {o.mini_batch_size}: larger than a step's rollouts "
                f"(data.prompt_batch_size * algorithm.group_size = {rollouts}{' plus guided ones' if a.guided else ''})"
            )
        if a.aggregation == "paper" and o.mini_batch_size is not None:
            p.append("algorithm.aggregation = 'paper' normalises over whole prompt groups; set optim.mini_batch_size=null")
        return p

    def __post_init__(self) -> None:
        problems = self.check()
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type[_Section]] = {
    "algorithm": AlgorithmConfig, "generation": GenerationConfig, "data": DataConfig, "optim": OptimConfig, "backend": BackendConfig, "run": RunConfig,
}
