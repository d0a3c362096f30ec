"""What a host trainer needs from a policy implementation, and the dual-context batch.

Three small protocols, one per role (STYLE point 18), each declaring every member its
callers use, so that a host calls them without probing:

- :class:`PromptTokenizer`: text <-> token ids, special ids, the context length, the
  chat template (prompt preparation, decoding, evaluation);
- :class:`Generator`: rollouts from the current weights (pi_old for the step);
- :class:`Policy`: dual-context log-probs (with and without the reference), the update
  step, checkpoints.

:class:`PolicyBackend` is all three in one object: the embedded torch backend
(``backends/torch``). A host whose roles live in different places (NeMo-Aligner: a
TensorRT-LLM engine generates, the Megatron actor scores and trains) implements each
protocol where it belongs. Every algorithmic decision stays in ``nemo_guide.core`` and
the named steps of ``nemo_guide.steps``.

The :class:`RolloutBatch` is DESIGN section 3's dual-context batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import torch

Context = Literal["plain", "sample"]
"""Which prompt the response tokens are scored behind: the plain prompt or the one it was sampled with."""


@dataclass(frozen=True)
class RolloutBatch:
    """``N`` rollouts, plain and guided, with everything the update needs.

    Token ids are Python lists (ragged); per-rollout values are tensors of Shape ``[N]``;
    per-token values are tensors of Shape ``[N, L]`` aligned on response positions
    (``L`` = the longest response), left-aligned, ``loss_mask`` True where a token counts.
    """

    plain_prompt_ids: list[list[int]]
    """The prompt without hint, after the chat template."""
    sample_prompt_ids: list[list[int]]
    """The prompt the response was sampled with (the hinted one for guided rollouts)."""
    response_ids: list[list[int]]
    """Sampled tokens, ending with EOS when the model stopped."""
    guided: torch.Tensor
    """Shape: ``[N]``, bool."""
    group: torch.Tensor
    """Shape: ``[N]``, long: the prompt index in the step's batch (-1: in no group)."""
    rewards: torch.Tensor
    """Shape: ``[N]``, float."""
    loss_mask: torch.Tensor
    """Shape: ``[N, L]``, bool: response tokens of rollouts that are trained on."""
    advantages: torch.Tensor | None = None
    """Shape: ``[N]``."""
    old_logprobs: torch.Tensor | None = None
    """log pi_old(response | context per ``algorithm.old_logprob_context``). Shape: ``[N, L]``;
    a placeholder (NaN) on the rows of ``old_from_current``."""
    old_from_current: torch.Tensor | None = None
    """Shape: ``[N]``, bool: rows whose pi_old is the training forward's own log-probs, detached
    (the update is on-policy and the row's pi_old context is its plain prompt:
    ``algorithm.old_logprobs=reuse``). The policy puts them into ``old_logprobs``
    (:meth:`with_current_as_old`) right before it calls the loss. None: no such row."""
    ref_logprobs: torch.Tensor | None = None
    """log pi_ref(response | plain prompt), for the KL term. Shape: ``[N, L]``."""
    sample_logprobs: torch.Tensor | None = None
    """log pi_sampler(response | sampling prompt) as the generator reported it (a rollout
    engine's), for ``algorithm.rollout_correction``. Shape: ``[N, L]``."""
    is_weights: torch.Tensor | None = None
    """Per-token importance weights of the policy loss (truncated importance sampling
    against the sampler). Shape: ``[N, L]``."""

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def response_length(self) -> int:
        """``L``."""
        return self.loss_mask.shape[1]

    def prompts(self, context: Context) -> list[list[int]]:
        return self.plain_prompt_ids if context == "plain" else self.sample_prompt_ids

    def select(self, index: Sequence[int] | torch.Tensor) -> "RolloutBatch":
        """The rollouts at ``index`` (same ``L``)."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        rows = idx.tolist()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in rows]
            else:
                out[f.name] = value[idx.to(value.device)]
        return RolloutBatch(**out)

    def to_device(self, device: torch.device | str) -> "RolloutBatch":
        """The same batch with its tensors on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    def with_(self, **changes) -> "RolloutBatch":
        return replace(self, **changes)

    def with_current_as_old(self, logprobs: torch.Tensor) -> "RolloutBatch":
        """This (micro-)batch with ``old_logprobs`` taken from ``logprobs`` on the rows of
        ``old_from_current``: what a policy's training step does before it calls the loss, so
        the loss sees pi_old = pi_theta there, bit for bit, with no gradient through it.

        Args:
            logprobs: the training forward's log pi_theta(response | plain prompt), on the
                device of this batch's tensors. Shape: ``[n, L]``.
        """
        if self.old_from_current is None or self.old_logprobs is None:
            return self
        current = self.old_from_current.to(logprobs.device).unsqueeze(-1)  # [n, 1]
        return replace(self, old_logprobs=torch.where(current, logprobs.detach(), self.old_logprobs.to(logprobs.device)))


@dataclass(frozen=True)
class Totals:
    """What one optimizer step's loss is normalised by: the counted tokens and rollouts of its
    whole mini-batch. A data-parallel host sums them over every rank's share, so each rank's
    micro-batches carry their share of the *global* mini-batch."""

    tokens: float
    """Tokens with ``loss_mask`` True."""
    rows: float
    """Rollouts with at least one such token."""

    @classmethod
    def of(cls, batch: RolloutBatch) -> "Totals":
        """The totals of one process's ``batch``."""
        return cls(float(batch.loss_mask.sum()), float(batch.loss_mask.any(-1).sum()))


TRAIN_ENTROPY = "train_step/entropy"
"""Key of :meth:`Policy.train_step`'s result, called ``with_entropy``: the training forward's
per-token entropy of the mini-batch, Shape ``[n, L]`` float32 on the CPU in the mini-batch's row
order, zero on padding, NaN on rows it did not score (an update stopped by a non-finite loss).
The one value of that result that is a tensor; :func:`nemo_guide.steps.update` takes it out."""


LossFn = Callable[["RolloutBatch", torch.Tensor, "torch.Tensor | None", Totals], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(micro_batch, logprobs [n, L], entropy [n, L] | None, totals) -> (loss, metrics)``.

Called once per micro-batch; the policy sums the returned losses' gradients over the
micro-batches of one mini-batch, so the loss must already carry the micro-batch's share
of the mini-batch's ``totals`` (see ``nemo_guide.steps.micro_share``)."""


class PromptTokenizer(Protocol):
    """Text <-> token ids for prompts and responses."""

    pad_id: int
    """Token id of padding."""
    eos_ids: tuple[int, ...]
    """Token ids that end a response; ``eos_ids[0]`` is appended to reference solutions."""
    max_length: int | None
    """Context length in tokens (prompt + response), None where unbounded."""
    chat_tokenizer: Any | None
    """A Hugging Face tokenizer with ``apply_chat_template`` (``data.prompt_style=chat``), or None."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Prompt text (already templated) to token ids; ``add_special_tokens=False`` for text
        whose template already holds them (chat templates) and for reference solutions.
        Raises ``ValueError`` for text the tokenizer cannot represent."""

    def decode(self, ids: Sequence[int]) -> str:
        """Response ids to text, without special tokens."""


class Generator(Protocol):
    """Rollouts from the current policy."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> tuple[list[list[int]], list[bool]]:
        """One response per prompt from the current weights (pi_old for this step);
        ``temperature == 0`` is greedy.

        Returns ``(responses, finished)``: token ids (ending with EOS when the model
        stopped) and whether each stopped before ``max_new_tokens``. Deterministic for a
        given ``seed``.
        """


class LogprobGenerator(Generator, Protocol):
    """A generator that also reports the log-prob its sampler gave each token it sampled
    (``algorithm.rollout_correction`` needs them)."""

    def generate_with_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> tuple[list[list[int]], list[bool], list[list[float]]]:
        """:meth:`Generator.generate` plus, per response, the sampler's log-prob of each of
        its tokens (after temperature and top-p, as the tokens were drawn). Raises
        ``RuntimeError`` where the sampler in use cannot report them."""


class Policy(Protocol):
    """Scoring and training of the policy (and the frozen reference)."""

    def describe(self) -> str:
        """One line naming the model, its size, device and dtype (for logs)."""

    def logprobs(
        self,
        batch: RolloutBatch,
        context: Context,
        *,
        reference: bool = False,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(response token | prompt of ``context``, earlier response tokens), no gradient.

        ``reference=True`` scores with the frozen reference policy. Returns
        ``(logprobs [N, L], entropy [N, L] | None)`` on the CPU, zero where the response
        is padding.
        """

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, *, micro_batch_size: int, with_entropy: bool = False) -> dict[str, float]:
        """One optimizer step on ``batch`` (a mini-batch), scored behind the plain prompt.

        Micro-batches of ``micro_batch_size`` rollouts accumulate gradients; each micro-batch
        goes to ``loss_fn`` after :meth:`RolloutBatch.with_current_as_old` with its log-probs
        (``loss_fn`` gets the per-token entropy too when ``with_entropy``); then the gradient
        norm is clipped and the optimizer steps. A non-finite loss or gradient skips the step
        (``optim/skipped = 1``) instead of corrupting the weights. Returns the reduced loss
        metrics plus ``optim/grad_norm``, ``optim/lr`` and ``optim/skipped``, and with
        ``with_entropy`` the per-token entropy under :data:`TRAIN_ENTROPY`.
        """

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current weights as the reference policy (for the KL term)."""

    def save(self, directory: Path) -> None:
        """Write weights (safetensors) and optimizer state into ``directory`` (which exists)."""

    def load(self, directory: Path) -> None:
        """Restore everything :meth:`save` wrote (exact resume)."""

    def load_weights(self, directory: Path) -> None:
        """Restore only the weights :meth:`save` wrote (evaluation of a checkpoint)."""


class PolicyBackend(PromptTokenizer, Generator, Policy, Protocol):
    """All three roles in one object: what the embedded loop (``nemo_guide.loop``) runs on."""
