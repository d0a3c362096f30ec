"""Guided prompts: the hint goes inside the user turn, before any chat template."""

from __future__ import annotations

import re

# Paper Appendix G; DESIGN section 4.
DEFAULT_HINT_TEMPLATE = (
    "{problem}\n"
    "A hint to the problem is provided below:\n"
    "[HINT_START]\n"
    "{hint}\n"
    "[HINT_END]\n"
    "Consider the hint but start your solution from scratch and do not directly reference the hint "
    '(e.g. avoid phrases like "using the hint").'
)

_FIELD = re.compile(r"\{(problem|hint)\}")


def format_guided_prompt(problem: str, hint: str, template: str | None = None) -> str:
    """The user message of a guided rollout: ``problem`` with ``hint`` per ``template``.

    Args:
        problem: the plain question.
        hint: the guidance text.
        template: must contain ``{problem}`` and ``{hint}`` once each; other braces are
            literal (LaTeX in a template needs no escaping). Default: Appendix G's.
    """
    template = DEFAULT_HINT_TEMPLATE if template is None else template
    for name in ("problem", "hint"):
        count = template.count("{" + name + "}")
        if count != 1:
            raise ValueError(f"hint template must contain {{{name}}} exactly once, found {count}: {template[:120]!r}")
    if not hint or not hint.strip():
        raise ValueError("hint is empty; a guided prompt needs guidance text (see `nemo-guide hints`)")
    values = {"problem": problem, "hint": hint}
    # One pass, so a '{hint}' inside the problem text is not substituted.
    return _FIELD.sub(lambda m: values[m.group(1)], template)
