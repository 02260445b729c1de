"""Model families: how to open the reasoning, what closes it, and how to ask for the answer.

A family turns a question into a prompt through the model's own chat template, says which text the
model writes to end its thinking (``think_end``), what to append to close the thinking when
codestop stops it (``close_thinking``), the probe prompt (asked inside the thinking, never closing
it) and the answer prompt. Plain instruct models (Qwen2.5, SmolLM2, ...) have no thinking markers:
their whole chain-of-thought answer counts as the reasoning, and ending it means appending the
answer prompt directly.

The families are checked against the models' real chat templates (tests/fixtures/chat_templates,
tests/test_real_templates.py): Qwen3, QwQ, both DeepSeek-R1 distill revisions (the original's
generation prompt does not open ``<think>``, the later one's does), Llama-Nemotron v1 (thinking
switched by the system prompt), Nemotron Nano v2 (``/think`` and ``/no_think`` in the system
prompt) and gpt-oss (harmony channels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from codestop.errors import ParameterError

if TYPE_CHECKING:
    from codestop.engines.base import Engine

# The reference code's probe: still inside the thinking, ends at \boxed{ so the first generated
# token is already the answer; the probe stops at the "}" that closes the box.
PROBE_PROMPT = "\n**Final Answer**\n\nThe final answer is \\boxed{"
ANSWER_PROMPT = "**Final Answer**\n\nThe final answer is \\boxed{"
STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."


Message = dict[str, str]

# How a family's template turns thinking off (``Family.thinking_switch``)
TEMPLATE_ARGUMENT = "template argument"  # Qwen3: the template's enable_thinking argument
SYSTEM_PROMPT = "system prompt"  # Llama-Nemotron v1: "detailed thinking on" / "detailed thinking off"
SYSTEM_TAG = "system tag"  # Nemotron v1.5 / Nano v2: "/think" / "/no_think" in the system prompt


@dataclass(frozen=True)
class Family:
    name: str
    think_start: str = ""  # what opens the reasoning, when the template's generation prompt already ends with it
    open_thinking: str = ""  # appended to the prompt to open the reasoning when the template did not
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
    thinking_switch: str = ""  # how the template turns thinking off (see above); "" = it cannot
    efforts: tuple[str, ...] = ()  # the reasoning efforts the template's ``reasoning_effort`` takes; () = no such notion

    @property
    def thinks(self) -> bool:
        return bool(self.think_end)

    def messages(self, question: str) -> list[Message]:
        if self.template is not None:
            user = self.template.replace("{question}", question.strip())
        else:
            user = f"{question.strip()}\n\n{self.instruction}" if self.instruction else question.strip()
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]

    def build_prompt(self, engine: Engine, question: str) -> str:
        """The prompt text, ending where the model starts reasoning."""
        return self.render(engine, self.messages(question))

    def render(self, engine: Engine, messages: list[Message]) -> str:
        """A conversation through the model's chat template, opened for reasoning."""
        return self.open(engine, messages)[1]

    def open(self, engine: Engine, messages: list[Message]) -> tuple[Family, str]:
        """The family as it applies to this conversation, and the conversation through the model's
        chat template, opened for reasoning exactly once.

        The conversation's own switch wins (a system prompt "detailed thinking off", a "/no_think"
        tag), and a system prompt the family needs is added when the conversation has none. Earlier
        turns are rendered as the template renders them (the real templates drop their reasoning).
        A template whose generation prompt already opens the thinking (Qwen3, QwQ, the later R1
        distills, Nemotron Nano v2) is not opened again; one that closes an empty thinking block
        (thinking switched off) leaves a family that does not think."""
        family = self._switched_by(messages)
        prompt = engine.chat_template(family._with_system(messages), **family.template_kwargs)
        tail = prompt.rstrip()
        if not family.thinks:
            opener = FAMILIES[family.name].think_start if family.name in FAMILIES else ""
            if opener and tail.endswith(opener):  # the conversation's own tag switched it back on
                return family._thinking(), prompt
            return family, prompt
        if tail.endswith(family.think_end):  # the template wrote an empty, closed block: no thinking
            return family._not_thinking(family.template_kwargs, family.system), prompt
        if not tail.endswith(family.think_start):
            prompt += family.open_thinking
        return family, prompt

    def forced_answer_text(self) -> str:
        """What codestop appends when it stops the thinking: close it, then ask for the box."""
        if self.thinks:
            return self.close_thinking + self.answer_prompt
        return "\n\n" + self.answer_prompt

    def switched(self, enable_thinking: bool) -> Family:
        """The family with its thinking switched on or off through its template's own switch.
        Switching off a family whose template has none is a ParameterError (it would be ignored)."""
        if self.thinking_switch == TEMPLATE_ARGUMENT:
            if enable_thinking:
                return self._thinking(template_kwargs={**self.template_kwargs, "enable_thinking": True})
            return self._not_thinking({**self.template_kwargs, "enable_thinking": False}, self.system)
        if self.thinking_switch == SYSTEM_PROMPT:
            if enable_thinking:
                return self._thinking(system="detailed thinking on")
            return self._not_thinking(self.template_kwargs, "detailed thinking off")
        if self.thinking_switch == SYSTEM_TAG:
            return self._thinking(system="/think") if enable_thinking else self._not_thinking(self.template_kwargs, "/no_think")
        if enable_thinking or not self.thinks:
            return self
        raise ParameterError("enable_thinking", enable_thinking, f"cannot be honoured: the {self.name} family's chat "
                             "template has no switch to turn thinking off (Qwen3 and Nemotron have one)")

    def with_effort(self, effort: str | None) -> Family:
        """The family with a client's ``reasoning_effort`` set as its template's variable (gpt-oss:
        "Reasoning: high" in the system message). A family with no notion of effort is unchanged
        (the effort means nothing to its template); one with a notion refuses an effort it does not
        know (ParameterError), rather than render one its model was never trained on."""
        if effort is None or not self.efforts:
            return self
        if effort not in self.efforts:
            raise ParameterError("reasoning_effort", effort, f"is not an effort the {self.name} family's template knows; "
                                 f"use one of {', '.join(self.efforts)}")
        return replace(self, template_kwargs={**self.template_kwargs, "reasoning_effort": effort})

    def _thinking(self, **changes: Any) -> Family:
        """The family thinking again: its markers as the family it is named after has them."""
        base = FAMILIES.get(self.name, self)
        return replace(self, think_start=base.think_start, open_thinking=base.open_thinking, think_end=base.think_end,
                       close_thinking=base.close_thinking, **changes)

    def _not_thinking(self, template_kwargs: dict[str, Any], system: str | None) -> Family:
        return replace(self, think_start="", open_thinking="", think_end="", close_thinking="",
                       template_kwargs=template_kwargs, system=system)

    def _switched_by(self, messages: list[Message]) -> Family:
        """The switch a conversation sets itself: Nemotron v1's "detailed thinking on/off" in its
        system prompt; Qwen3's and Nemotron v2's last "/think" or "/no_think" (Nemotron v2's template
        reads the tag itself; Qwen3's model does, and rendering with enable_thinking false gives the
        empty block it would write)."""
        if self.thinking_switch == SYSTEM_PROMPT:
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
            said = re.findall(r"detailed thinking (on|off)", system)
            return self.switched(said[-1] == "on") if said else self
        if not self.thinks or not self.thinking_switch:
            return self  # the template reads a tag that turns it back on itself (see open)
        said = [m["content"] for m in messages if m["role"] in ("system", "user") and _TAG.search(m["content"])]
        if said and _TAG.findall(said[-1])[-1] == "/no_think":
            return self._not_thinking({**self.template_kwargs, "enable_thinking": False}, None)
        return self

    def _with_system(self, messages: list[Message]) -> list[Message]:
        """``messages`` with the family's system prompt first: added, or put before the
        conversation's own system prompt unless that already sets the switch."""
        if not self.system:
            return messages
        if messages and messages[0]["role"] == "system":
            own = messages[0]["content"]
            if self.system in own or (self.thinking_switch == SYSTEM_PROMPT and "detailed thinking" in own) or (
                    self.thinking_switch == SYSTEM_TAG and _TAG.search(own)):
                return messages
            return [{"role": "system", "content": f"{self.system}\n{own}"}, *messages[1:]]
        return [{"role": "system", "content": self.system}, *messages]


_TAG = re.compile(r"/no_think|/think")
_THINK: dict[str, Any] = dict(think_start="<think>", open_thinking="<think>\n", think_end="</think>", close_thinking="\n</think>\n\n")

FAMILIES: dict[str, Family] = {
    "qwen3": Family("qwen3", **_THINK, template_kwargs={"enable_thinking": True}, thinking_switch=TEMPLATE_ARGUMENT),
    "deepseek-r1": Family("deepseek-r1", **_THINK),  # the original template does not open <think>, the later one does
    "qwq": Family("qwq", **_THINK),
    # Llama-3.1/3.3-Nemotron v1 (Nano 8B, Super 49B, Ultra 253B): the system prompt switches thinking
    "nemotron": Family("nemotron", **_THINK, system="detailed thinking on", thinking_switch=SYSTEM_PROMPT),
    # Nemotron Super v1.5, Nano v2 and later: "/think" / "/no_think" in the system prompt, read by the template
    "nemotron-v2": Family("nemotron-v2", **_THINK, thinking_switch=SYSTEM_TAG),
    "think": Family("think", **_THINK),  # any other model whose template speaks <think>
    "gpt-oss": Family(
        "gpt-oss",
        # harmony: the generation prompt is "<|start|>assistant"; codestop opens the analysis channel
        # itself, so the reasoning is the analysis and the model cannot skip it for the final channel
        think_start="<|channel|>analysis<|message|>",
        open_thinking="<|channel|>analysis<|message|>",
        think_end="<|end|>",
        close_thinking="<|end|><|start|>assistant<|channel|>final<|message|>",
        efforts=("low", "medium", "high"),  # the template's "Reasoning: <effort>" (medium when unset)
    ),
    "plain": Family("plain"),
}


def detect_family(engine: Engine) -> Family:
    """Guess the family from the model's name (a GGUF's general.name too), type and chat template."""
    info = engine.model_info()
    names = " ".join(re.sub(r"[\s_]+", "-", str(info.get(key, "") or "").lower()) for key in ("name", "gguf_name"))
    model_type = str(info.get("model_type", "")).lower()
    template = str(info.get("chat_template", "") or "")
    if "gpt-oss" in names or model_type == "gpt_oss" or "<|channel|>final<|message|>" in template:
        return FAMILIES["gpt-oss"]
    if "nemotron" in names:
        tags = "/no_think" in template or re.search(r"v1[.-]5|-v2|nemotron-(3|h)\b", names)
        return FAMILIES["nemotron-v2" if tags else "nemotron"]
    if "<|start_header_id|>" in template and "</think>" in template and "/no_think" not in template:
        return FAMILIES["nemotron"]  # a Llama-3 template that drops earlier thinking: Llama-Nemotron v1's
    if "qwq" in names:
        return FAMILIES["qwq"]
    if model_type.startswith("qwen3") or "qwen3" in names:
        return FAMILIES["qwen3"]
    if "deepseek-r1" in names or "r1-distill" in names or ("<｜Assistant｜>" in template and "</think>" in template):
        return FAMILIES["deepseek-r1"]
    if "<think>" in template or "</think>" in template:
        return FAMILIES["think"]
    return FAMILIES["plain"]


def get_family(name_or_none: str | None, engine: Engine, enable_thinking: bool | None = None) -> Family:
    """The family called ``name`` (or detected when None), with its thinking switch applied.

    ``enable_thinking=False`` asks the template's own switch (Qwen3's template argument, Nemotron's
    system prompt) for no thinking, so the model answers at once and there is nothing to stop; a
    thinking family without a switch refuses it (ParameterError)."""
    if name_or_none is None:
        family = detect_family(engine)
    else:
        try:
            family = FAMILIES[name_or_none]
        except KeyError:
            raise ValueError(f"family: unknown family {name_or_none!r}; choose one of {', '.join(FAMILIES)}") from None
    return family if enable_thinking is None else family.switched(enable_thinking)
