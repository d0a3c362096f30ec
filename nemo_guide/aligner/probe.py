"""The TensorRT-LLM probe: does the engine sample from the model the trainer scores?

At start-up (and every ``model.ppo.trt_llm.probe_every`` steps) a fixed probe batch, the first
``probe_prompts`` training prompts without hints, goes through two comparisons:

1. **Greedy decisions.** The engine decodes it greedily, and so does Megatron's own generation
   from the same weights. Each row is compared up to and including its first differing token
   (after that the prefixes differ and later tokens are not comparable decisions);
   ``greedy_diff_frac`` = rows that diverged / decisions compared.
2. **Log-probs.** The engine samples it with the rollout settings (fixed seed) and reports the
   log-prob of each token it drew; the Megatron actor scores the same tokens behind the same
   prompts. ``logprob_diff_mean`` / ``_max`` = mean / max over tokens of ``|engine - trainer|``.
   Sampled rather than greedy tokens: TensorRT-LLM reports the log-prob *within the sampling
   set* (``log P(token | token in top-k)``), which is 0 for every greedy token.

The run stops (:class:`ProbeError`) when any of the three exceeds its tolerance. Defaults,
reasoned from bf16 (nothing was measured on a GPU for this project yet; see the README's
"TensorRT-LLM rollouts"): bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.002); two
implementations of the same bf16 network (fused attention, GEMM split orders, norms in fp32 or
not) differ in each logit by ~1e-2 to 1e-1 after tens of layers, mostly a common shift that
softmax removes; a sampled token's log-prob moves by ``(1 - p) * dz``, so the *mean* per-token
gap of a correct engine is ~0.005-0.03 nats and its *max* over a few hundred sampled tokens
(rare low-probability tokens) a few tenths. A lost QKV bias moves whole attention patterns:
O(1) nats on average. Hence mean 0.05, max 1.5, greedy 0.1 (near-ties flip a few percent of
decisions at most).

No NeMo import: the engine and the actor are reached through :class:`ProbeHost`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from nemo_guide.aligner.config import TRT_KEY as KEY
from nemo_guide.aligner.config import ProbeSettings
from nemo_guide.backends.base import Context, RolloutBatch
from nemo_guide.core.mismatch import greedy_disagreement, logprob_gap
from nemo_guide.errors import RunError
from nemo_guide.steps import build_batch

class ProbeError(RunError):
    """The engine and the trainer disagree beyond the probe's tolerances."""


@dataclass(frozen=True)
class ProbeReport:
    """What one probe measured (plain numbers, the same on every rank)."""

    step: int
    prompts: int
    tokens: int
    """Sampled tokens whose log-probs were compared."""
    logprob_diff_mean: float
    logprob_diff_max: float
    greedy_decisions: int
    greedy_disagreements: int

    @property
    def greedy_diff_frac(self) -> float:
        return self.greedy_disagreements / self.greedy_decisions if self.greedy_decisions else 0.0

    def failures(self, settings: ProbeSettings) -> list[str]:
        """One line per exceeded tolerance, naming its key."""
        out = []
        if not self.logprob_diff_mean <= settings.tolerance:
            out.append(f"mean |engine - trainer| log-prob {self.logprob_diff_mean:.4f} > {KEY}.probe_tolerance = {settings.tolerance}")
        if not self.logprob_diff_max <= settings.max_tolerance:
            out.append(f"max |engine - trainer| log-prob {self.logprob_diff_max:.4f} > {KEY}.probe_max_tolerance = {settings.max_tolerance}")
        if self.greedy_diff_frac > settings.greedy_tolerance:
            out.append(f"greedy decisions differing {self.greedy_diff_frac:.4f} > {KEY}.probe_greedy_tolerance = {settings.greedy_tolerance}")
        return out

    def format(self, settings: ProbeSettings) -> str:
        """The report the trainer logs (README, "TensorRT-LLM rollouts")."""
        verdict = "FAIL" if self.failures(settings) else "pass"
        return (
            f"TensorRT-LLM probe at step {self.step}: {self.prompts} prompts, {self.tokens} sampled tokens, {self.greedy_decisions} greedy decisions\n"
            f"  log-prob |engine - trainer| per token: mean {self.logprob_diff_mean:.4f}, max {self.logprob_diff_max:.4f} "
            f"(tolerances {settings.tolerance}, {settings.max_tolerance})\n"
            f"  greedy tokens differing: {self.greedy_disagreements} of {self.greedy_decisions} decisions = {self.greedy_diff_frac:.4f} "
            f"(tolerance {settings.greedy_tolerance})\n"
            f"  result: {verdict}"
        )

    def metrics(self) -> dict[str, float]:
        return {"probe/logprob_diff_mean": self.logprob_diff_mean, "probe/logprob_diff_max": self.logprob_diff_max,
                "probe/greedy_diff_frac": self.greedy_diff_frac}


def _padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, L], lengths [B])`` with -1 beyond each row."""
    width = max((len(r) for r in rows), default=0)
    tokens = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return tokens, torch.tensor([len(r) for r in rows], dtype=torch.long)


def compare(step: int, engine_greedy: Sequence[Sequence[int]], trainer_greedy: Sequence[Sequence[int]],
            engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> ProbeReport:
    """The report of one probe.

    Args:
        engine_greedy, trainer_greedy: each prompt's greedy response tokens from the engine and
            from Megatron's generation.
        engine_logprobs: the engine's log-prob of each token it sampled. Shape: ``[B, L]``.
        trainer_logprobs: the actor's log-probs of the same tokens behind the same prompts. Shape: ``[B, L]``.
        mask: True on sampled tokens. Shape: ``[B, L]``, bool.
    """
    decisions, differ = greedy_disagreement(*_padded(engine_greedy), *_padded(trainer_greedy))
    gap = logprob_gap(engine_logprobs, trainer_logprobs, mask)
    return ProbeReport(step, len(engine_greedy), int(gap["tokens"]), float(gap["mean"]), float(gap["max"]), int(decisions), int(differ))


def check(report: ProbeReport, settings: ProbeSettings) -> None:
    """Raise :class:`ProbeError` naming every exceeded tolerance and what to look at."""
    failures = report.failures(settings)
    if failures:
        raise ProbeError(
            f"the TensorRT-LLM engine does not sample from the model the trainer scores (probe at step {report.step}): "
            + "; ".join(failures)
            + ". A lost attention bias (model.qkv_bias) or another export error does this; the engine's rollouts would make every "
            "importance ratio wrong. Check the export (nemo_guide.aligner.trt_export), or raise the tolerance if the gap is numerics "
            "(e.g. fp16), or generate with Megatron (model.ppo.trt_llm.enable = false)."
        )


class ProbeHost(Protocol):
    """What the probe needs from a host (``nemo_guide.aligner.host.AlignerHost``)."""

    def greedy(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, engine: bool) -> list[list[int]]:
        """Greedy responses from the engine (``engine=True``) or from Megatron's generation."""

    def generate_with_logprobs(self, prompts, *, max_new_tokens: int, temperature: float, top_p: float, seed: int):
        """The engine's samples, finished flags and per-token log-probs."""

    def logprobs(self, batch: RolloutBatch, context: Context, *, reference: bool = False, with_entropy: bool = False):
        """The actor's log-probs of ``batch``'s responses."""


def run_probe(host: ProbeHost, prompts: Sequence[Sequence[int]], settings: ProbeSettings, *, step: int, max_new_tokens: int,
              temperature: float, top_p: float, seed: int) -> ProbeReport:
    """Both comparisons on ``prompts`` (the probe batch); every rank gets the same report."""
    prompts = [list(p) for p in prompts]
    engine_greedy = host.greedy(prompts, max_new_tokens=max_new_tokens, engine=True)
    trainer_greedy = host.greedy(prompts, max_new_tokens=max_new_tokens, engine=False)
    responses, _, logprobs = host.generate_with_logprobs(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    n = len(prompts)
    batch = build_batch(prompts, prompts, responses, torch.zeros(n), torch.arange(n), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))
    trainer, _ = host.logprobs(batch, "sample")
    engine = torch.zeros_like(batch.loss_mask, dtype=torch.float32)  # [B, L]
    for i, lp in enumerate(logprobs):
        engine[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return compare(step, engine_greedy, trainer_greedy, engine, trainer, batch.loss_mask)
