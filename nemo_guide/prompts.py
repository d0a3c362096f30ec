"""Prompts of a dataset, templated and tokenised once, with one policy for prompts that do not fit.

Training, the held-out evaluation during training and ``nemo-guide eval`` all prepare
prompts here, so a prompt means the same token ids everywhere and one rule decides
whether it can be run (:func:`prompt_problem`). What a caller does with an unusable prompt
differs by design and is stated where it happens: training refuses to start and lists
every one (:func:`require_usable`); evaluation scores it incorrect and counts it as
``unscorable`` (never dropped silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nemo_guide.backends.base import PromptTokenizer
from nemo_guide.data.records import Record
from nemo_guide.data.templates import PromptStyle, build_prompt
from nemo_guide.errors import RunError

MAX_LISTED = 20


@dataclass(frozen=True)
class PromptSettings:
    """How records become prompts (the ``data`` section's prompt fields)."""

    style: str = PromptStyle.PLAIN.value
    hint_template: str | None = None
    system_prompt: str | None = None
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    """The response budget: prompt + response must fit the model's context."""

    @classmethod
    def from_config(cls, cfg) -> "PromptSettings":
        """From a :class:`~nemo_guide.config.Config` (its ``data`` and ``generation`` sections)."""
        d = cfg.data
        return cls(d.prompt_style, d.hint_template, d.system_prompt, d.max_prompt_tokens, cfg.generation.max_new_tokens)


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text, its token ids, and why it cannot be run (None: it can)."""

    text: str
    ids: list[int]
    problem: str | None


@dataclass(frozen=True)
class PromptSet:
    """Every record's plain prompt, and its hinted prompt where the record has a hint."""

    records: list[Record]
    plain: list[Prompt]
    hinted: list[Prompt | None]


def prompt_problem(num_tokens: int, settings: PromptSettings, context: int | None) -> str | None:
    """Why a prompt of ``num_tokens`` tokens cannot be run, or None.

    The one overflow rule: a prompt is never cut; it must hold at least one token, at most
    ``data.max_prompt_tokens``, and leave ``generation.max_new_tokens`` of the model's context.
    """
    if num_tokens == 0:
        return "is empty after templating and tokenisation"
    if num_tokens > settings.max_prompt_tokens:
        return f"has {num_tokens} tokens, more than {settings.max_prompt_tokens} (data.max_prompt_tokens); shorten it or raise data.max_prompt_tokens"
    if context is not None and num_tokens + settings.max_new_tokens > context:
        return (
            f"has {num_tokens} tokens; with generation.max_new_tokens = {settings.max_new_tokens} that exceeds the model's "
            f"context of {context} tokens; shorten it or lower generation.max_new_tokens"
        )
    return None


def encode_prompt(text: str, tokenizer: PromptTokenizer, settings: PromptSettings) -> Prompt:
    """Tokenise one templated prompt and check it against :func:`prompt_problem`."""
    add_special = settings.style != PromptStyle.CHAT.value  # a chat template already holds them
    try:
        ids = tokenizer.encode(text, add_special_tokens=add_special)
    except ValueError as exc:  # characters the tokenizer cannot represent
        return Prompt(text, [], f"cannot be tokenised: {exc}")
    return Prompt(text, ids, prompt_problem(len(ids), settings, tokenizer.max_length))


def encode_prompts(
    records: Sequence[Record], tokenizer: PromptTokenizer, settings: PromptSettings, *, hinted: bool = True, source: str | None = None
) -> PromptSet:
    """Template and tokenise every record's plain prompt (and hinted prompt when ``hinted``).

    A prompt the tokenizer cannot encode is kept with its :attr:`Prompt.problem`. An error
    while building a prompt names the record's id and ``source`` (the dataset file or task):

    Raises:
        RunError: the template cannot be applied (a ``ValueError`` of the template or of the
            tokenizer's chat template, e.g. ``data.prompt_style=chat`` without one).
        Exception: anything else keeps its type and traceback, with the record in a note.
    """
    plain: list[Prompt] = []
    hints: list[Prompt | None] = []
    of = f" of {source}" if source else ""
    for r in records:
        kind = "prompt"
        try:
            text = build_prompt(r.problem, settings.style, tokenizer=tokenizer.chat_tokenizer, system_prompt=settings.system_prompt)
            plain.append(encode_prompt(text, tokenizer, settings))
            h = None
            if hinted and r.hint is not None:
                kind = "hinted prompt"
                h_text = build_prompt(
                    r.problem, settings.style, hint=r.hint, hint_template=settings.hint_template,
                    tokenizer=tokenizer.chat_tokenizer, system_prompt=settings.system_prompt,
                )
                h = encode_prompt(h_text, tokenizer, settings)
        except ValueError as exc:  # STYLE point 10: what a user can cause is a ValueError
            raise RunError(f"record {r.id!r}{of}: cannot build its {kind}: {exc}") from exc
        except Exception as exc:
            exc.add_note(f"while building the {kind} of record {r.id!r}{of}")
            raise
        hints.append(h)
    return PromptSet(list(records), plain, hints)


def require_usable(prompts: PromptSet, source: str, *, need_hints: bool, need_solutions: bool = False) -> PromptSet:
    """Training's policy: every record must be usable, or the run does not start.

    Raises:
        RunError: listing (up to 20 of) the records without a hint while guidance is on,
            without a solution in SFT mode, or whose prompt cannot be run.
    """
    problems: list[str] = []
    for r, plain, hinted in zip(prompts.records, prompts.plain, prompts.hinted, strict=True):
        if need_hints and r.hint is None:
            problems.append(f"record {r.id!r} has no hint, but algorithm.mode=guide_grpo guides failed prompts")
        if need_solutions and r.solution is None:
            problems.append(f"record {r.id!r} has no solution, but algorithm.mode=sft trains on reference solutions")
        for kind, prompt in (("prompt", plain), ("hinted prompt", hinted)):
            if prompt is not None and prompt.problem is not None:
                problems.append(f"record {r.id!r}: the {kind} {prompt.problem}")
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        fix = ""
        if any("no hint" in p for p in problems):
            fix = "\nfix: add hints (`nemo-guide hints`), or train with algorithm.mode=grpo or algorithm.guidance_threshold=never"
        raise RunError(f"{source}: {len(problems)} unusable record(s):\n  " + "\n  ".join(problems[:MAX_LISTED]) + more + fix)
    return prompts


class PromptSampler:
    """Seeded epochs over a dataset: each epoch is a fresh permutation; the position is saved."""

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.size - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}
