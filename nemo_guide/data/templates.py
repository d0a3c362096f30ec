"""Prompt templates: how a (possibly hinted) question becomes the model's prompt text.

- ``"plain"``: the question as is (the built-in synthetic task).
- ``"think_answer"``: the RLVR/SFT prompt of paper Appendix H
  (``<think>...</think><answer>...</answer>``).
- ``"chat"``: the reasoning system prompt of paper Appendix I plus the tokenizer's own
  chat template (any Hugging Face tokenizer with ``apply_chat_template``).

In every style the hint is part of the user's question (see
:func:`nemo_guide.data.hints.format_guided_prompt`), so a guided prompt differs from the
plain one only inside the user turn.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable

from nemo_guide.core.registry import Registry
from nemo_guide.data.hints import format_guided_prompt

THINK_ANSWER_TEMPLATE = (
    "A conversation between user and assistant. The user asks a question, and the assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\n"
    "Assistant:"
)

REASONING_SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final solution. "
    "This involves analyzing, summarizing, exploring, reassessing, and refining your thought process through "
    "multiple iterations. Structure your response into two sections: Thought and Solution. In the Thought section, "
    'present your reasoning using the format: "<think>\n {thoughts} </think>\n". Each thought should include '
    "detailed analysis, brainstorming, verification, and refinement of ideas. After \"</think>\n,\" in the Solution "
    "section, provide the final, logical, and accurate answer, clearly derived from the exploration in the Thought "
    "section. If applicable, include the answer in \\boxed{} for closed-form results like multiple choices or "
    "mathematical solutions."
)


class PromptStyle(str, Enum):
    PLAIN = "plain"
    THINK_ANSWER = "think_answer"
    CHAT = "chat"


StyleFn = Callable[[str, Any, "str | None"], str]
STYLES: Registry[StyleFn] = Registry("prompt style", PromptStyle)


@STYLES.register(PromptStyle.PLAIN)
def _plain(question: str, tokenizer: Any, system_prompt: str | None) -> str:
    return question


@STYLES.register(PromptStyle.THINK_ANSWER)
def _think_answer(question: str, tokenizer: Any, system_prompt: str | None) -> str:
    return THINK_ANSWER_TEMPLATE.replace("{question}", question)


@STYLES.register(PromptStyle.CHAT)
def _chat(question: str, tokenizer: Any, system_prompt: str | None) -> str:
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError("prompt style 'chat' needs a tokenizer with a chat template (a Hugging Face tokenizer)")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "prompt style 'chat': this tokenizer has no chat_template; use data.prompt_style=think_answer or plain, "
            "or a tokenizer directory whose tokenizer_config.json defines one"
        )
    system = REASONING_SYSTEM_PROMPT if system_prompt is None else system_prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(
    problem: str,
    style: str | PromptStyle = PromptStyle.PLAIN,
    *,
    hint: str | None = None,
    hint_template: str | None = None,
    tokenizer: Any = None,
    system_prompt: str | None = None,
) -> str:
    """Prompt text for ``problem``, guided when ``hint`` is given.

    Args:
        problem: the question.
        style: a :class:`PromptStyle` name.
        hint: guidance to put in the user turn (None for a plain prompt).
        hint_template: see :func:`format_guided_prompt`.
        tokenizer: a Hugging Face tokenizer (style ``"chat"`` only).
        system_prompt: overrides Appendix I's system prompt (style ``"chat"``; ``""`` for none).
    """
    question = problem if hint is None else format_guided_prompt(problem, hint, hint_template)
    return STYLES[style](question, tokenizer, system_prompt)
