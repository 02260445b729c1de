"""Answer extraction and grading."""

from __future__ import annotations

import re

_BOX_OPENERS = ("\\boxed{", "\\fbox{", "\\boxed {")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces respected), or None."""
    best = -1
    opener_len = 0
    for opener in _BOX_OPENERS:
        at = text.rfind(opener)
        if at > best:
            best, opener_len = at, len(opener)
    if best == -1:
        return None
    depth = 1
    start = best + opener_len
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = text[start:i].strip()
                return content or None
    return None


_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*\$?([^\n$]+?)\$?\s*(?:\.|$)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The last boxed answer, else what follows "the answer is"."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = _ANSWER_IS.findall(text)
    return matches[-1].strip() if matches else None
