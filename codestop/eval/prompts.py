"""Prompt styles for ``eval`` and ``record``: ``--prompt NAME|FILE`` and ``--system-prompt TEXT``.

A style changes only what the model is asked, never how codestop probes or stops it, so one trace
file per style compares prompts at equal stopping rules (the paper stacks CoDE-Stop on
Chain-of-Draft). A style is applied to the family resolved for the loaded engine
(:func:`codestop.families.get_family`), so a thinking model keeps its think tags, its answer prompt
and any system prompt it needs:

* ``step-by-step``: the families' own instruction (the default: what codestop always asked);
* ``solve-then-check``: solve, then check the answer a second way (:data:`SOLVE_THEN_CHECK`, what
  ``codestop demo`` asks), which gives a plain instruct model something after its answer to stop;
* ``chain-of-draft``: Chain-of-Draft (Xu et al., 2025): think step by step but keep each step a
  draft of at most five words;
* a path to a text file: the whole user message, with a ``{question}`` slot.

The run config records the resolved text (:meth:`PromptStyle.to_config`), not just the name, so a
run file says exactly what was asked even after a style's wording changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError
from codestop.families import STEP_BY_STEP, Family

QUESTION_SLOT = "{question}"

# For a plain instruct model, what a reasoning model does by itself: solve, then check the answer.
# Measured on the 0.5B, greedy, the demo's 24 problems (probes replayed offline from one recording
# per prompt; BENCHMARKS.md, "Demo settings"): with the plain "reason step by step" prompt the answer
# is the last line, so there is nothing after it to save, and every early stop lands on an
# intermediate result (a probe copies the last number computed, with confidence ~1): vanilla 67% ->
# 25-50% whatever the probe interval. With the check, the answer comes at about half the tokens and
# the check then often talks the model out of it (overthinking), which is what early stopping is for.
SOLVE_THEN_CHECK = (
    "Solve it step by step and write the answer in \\boxed{}. Then check the answer a second way, by "
    "working backwards from it, and state the final answer again in \\boxed{}."
)

# Chain-of-Draft's instruction (arXiv 2502.18600), its "####" separator replaced by the box that
# codestop's grading and probes read
CHAIN_OF_DRAFT = (
    "Think step by step, but only keep a minimum draft for each thinking step, with 5 words at most. "
    "Return the final answer at the end, within \\boxed{}."
)

PROMPT_STYLES: dict[str, str] = {
    "step-by-step": STEP_BY_STEP,
    "solve-then-check": SOLVE_THEN_CHECK,
    "chain-of-draft": CHAIN_OF_DRAFT,
}
DEFAULT_STYLE = "step-by-step"


@dataclass(frozen=True)
class PromptStyle:
    """What a run asks: a named style's ``instruction`` (appended to the question) or a template
    file's whole user message, and an optional system prompt."""

    name: str  # a style name, or the template file's path as given
    instruction: str | None = None
    template: str | None = None
    system: str | None = None

    def apply(self, family: Family) -> Family:
        """``family`` asking this style's question. A family's own system prompt (Nemotron's
        "detailed thinking on" switches its thinking on) is kept, the user's on the next line."""
        changes: dict[str, Any] = {}
        if self.template is not None:
            changes["template"] = self.template
        elif self.instruction is not None:
            changes["instruction"] = self.instruction
            changes["template"] = None
        if self.system:
            changes["system"] = f"{family.system}\n{self.system}" if family.system else self.system
        return dataclasses.replace(family, **changes)

    def to_config(self) -> dict[str, Any]:
        """The resolved texts, as a run config records them."""
        out: dict[str, Any] = {"style": self.name}
        if self.template is not None:
            out["template"] = self.template
        else:
            out["instruction"] = self.instruction
        out["system"] = self.system
        return out


def resolve_prompt(prompt: str | None = None, system_prompt: str | None = None) -> PromptStyle:
    """The style ``prompt`` names (default step-by-step) or the template file it points to."""
    system = system_prompt if system_prompt and system_prompt.strip() else None
    name = DEFAULT_STYLE if prompt is None else prompt
    if name in PROMPT_STYLES:
        return PromptStyle(name, instruction=PROMPT_STYLES[name], system=system)
    path = Path(name).expanduser()
    if not path.is_file():
        raise CodestopError(
            f"prompt: {name!r} is neither a style ({', '.join(PROMPT_STYLES)}) nor a template file"
        )
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CodestopError(f"prompt: cannot read the template {name!r} ({err})") from None
    if QUESTION_SLOT not in template:
        raise CodestopError(f"prompt: the template {name!r} has no {QUESTION_SLOT} slot for the question")
    return PromptStyle(name, template=template.strip(), system=system)
