"""Model families: how to open the reasoning, what closes it, and how to ask for the answer.

A family turns a question into a prompt through the model's own chat template, says which text the
model writes to end its thinking (``think_end``), what to append to close the thinking when
codestop stops it (``close_thinking``), the probe prompt (asked inside the thinking, never closing
it) and the answer prompt. Plain instruct models (Qwen2.5, SmolLM2, ...) have no thinking markers:
their whole chain-of-thought answer counts as the reasoning, and ending it means appending the
answer prompt directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codestop.engines.base import Engine

# The reference code's probe: still inside the thinking, ends at \boxed{ so the first generated
# token is already the answer; the probe stops at the "}" that closes the box.
PROBE_PROMPT = "\n**Final Answer**\n\nThe final answer is \\boxed{"
ANSWER_PROMPT = "**Final Answer**\n\nThe final answer is \\boxed{"
STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Family:
    name: str
    think_start: str = ""  # what opens the reasoning; appended to the prompt when the template does not
    think_end: str = ""  # what the model writes to end its thinking ("" = no thinking markers)
    system: str | None = None  # a system prompt the family needs (Nemotron's "detailed thinking on")
    instruction: str = STEP_BY_STEP  # appended to the question
    # a prompt style's whole user message with a "{question}" slot; replaces question + instruction
    # (``codestop eval --prompt FILE``, see codestop.eval.prompts)
    template: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    close_thinking: str = ""  # appended before the answer prompt on a stop
    probe_prompt: str = PROBE_PROMPT
    answer_prompt: str = ANSWER_PROMPT
    answer_prefix: str = "**Final Answer**\n\n"  # a plain model's own answer after a stop ("free" answers)

    @property
    def thinks(self) -> bool:
        return bool(self.think_end)

    def messages(self, question: str) -> list[dict[str, str]]:
        if self.template is not None:
            user = self.template.replace("{question}", question.strip())
        else:
            user = f"{question.strip()}\n\n{self.instruction}" if self.instruction else question.strip()
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]

    def build_prompt(self, engine: Engine, question: str) -> str:
        """The prompt text, ending where the model starts reasoning."""
        return self.render(engine, self.messages(question))

    def render(self, engine: Engine, messages: list[dict[str, str]]) -> str:
        """A conversation through the model's chat template, opened for reasoning."""
        prompt = engine.chat_template(messages, **self.template_kwargs)
        if self.think_start and not prompt.rstrip().endswith(self.think_start):
            # Qwen3 and Nemotron open <think> themselves, R1 distill templates already did; either
            # way the reasoning starts inside the thinking, so open it for the model.
            prompt += self.think_start + "\n"
        return prompt

    def forced_answer_text(self) -> str:
        """What codestop appends when it stops the thinking: close it, then ask for the box."""
        if self.thinks:
            return self.close_thinking + self.answer_prompt
        return "\n\n" + self.answer_prompt


_THINK: dict[str, Any] = dict(think_start="<think>", think_end="</think>", close_thinking="\n</think>\n\n")

FAMILIES: dict[str, Family] = {
    "qwen3": Family("qwen3", **_THINK, template_kwargs={"enable_thinking": True}),
    "deepseek-r1": Family("deepseek-r1", **_THINK),
    "qwq": Family("qwq", **_THINK),
    "nemotron": Family("nemotron", **_THINK, system="detailed thinking on"),
    "think": Family("think", **_THINK),  # any other model whose template speaks <think>
    "gpt-oss": Family(
        "gpt-oss",
        think_start="",  # the harmony template's generation prompt lets the model open its analysis channel
        think_end="<|end|>",
        close_thinking="<|end|><|start|>assistant<|channel|>final<|message|>",
    ),
    "plain": Family("plain"),
}


def detect_family(engine: Engine) -> Family:
    """Guess the family from the model's name, type and chat template."""
    info = engine.model_info()
    name = str(info.get("name", "")).lower()
    model_type = str(info.get("model_type", "")).lower()
    template = str(info.get("chat_template", "") or "")
    if "gpt-oss" in name or model_type == "gpt_oss":
        return FAMILIES["gpt-oss"]
    if "nemotron" in name:
        return FAMILIES["nemotron"]
    if "qwq" in name:
        return FAMILIES["qwq"]
    if model_type.startswith("qwen3") or "qwen3" in name:
        return FAMILIES["qwen3"]
    if "deepseek-r1" in name or "r1-distill" in name:
        return FAMILIES["deepseek-r1"]
    if "<think>" in template:
        return FAMILIES["think"]
    return FAMILIES["plain"]


def get_family(name_or_none: str | None, engine: Engine, enable_thinking: bool | None = None) -> Family:
    """The family called ``name`` (or detected when None), with Qwen3's thinking switch applied.

    ``enable_thinking=False`` on Qwen3 asks its template for an empty thinking block, so the model
    answers at once and there is nothing to stop."""
    if name_or_none is None:
        family = detect_family(engine)
    else:
        try:
            family = FAMILIES[name_or_none]
        except KeyError:
            raise ValueError(f"family: unknown family {name_or_none!r}; choose one of {', '.join(FAMILIES)}") from None
    if enable_thinking is not None and family.name == "qwen3":
        if enable_thinking:
            family = replace(family, template_kwargs={"enable_thinking": True})
        else:
            family = replace(
                family, think_start="", think_end="", close_thinking="", template_kwargs={"enable_thinking": False}
            )
    return family
