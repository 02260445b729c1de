"""How the proxy answers one request: a validated request (:mod:`codestop.serve.protocol`) becomes
a generation config, a policy and a prompt over the server-wide defaults; the controller runs it;
its output is split into ``reasoning_content`` and ``content`` and shaped as OpenAI's response, or
as its stream of SSE chunks, with ``usage``.

What a client sent is honoured or refused, never dropped: ``max_tokens`` caps reasoning plus answer,
``stop`` ends the visible output, the messages are rendered exactly as sent, a model the proxy
does not serve is a 404. The policy is chosen per request with an extra body field,
``{"codestop": {"method": "codestop", "tau": 7}}``, over the server-wide default; ``usage`` carries
codestop's own figures under ``usage.codestop``. Nothing is appended to what the model says unless
asked: when a policy stops a chat answer's thinking, the model closes it and answers in its own
words (``answer: "free"``); a raw completion just ends (``"none"``); the paper's forced
``\\boxed{}`` answer is ``"boxed"``.

Each answer is one :func:`codestop.controller.astream`: a streaming response turns its events into
SSE chunks, a plain one consumes it to the Result. Closing the stream closes its session, so a
client that leaves stops its generation.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from codestop.config import OLD_NAMES, GenerationConfig, cli_fields
from codestop.controller import Event, Result
from codestop.engines.base import Engine
from codestop.errors import ParameterError, UnknownParameter, require
from codestop.families import Family, get_family
from codestop.policies import METHOD_OPTIONS, NOT_EARLY, Policy, make_policy
from codestop.serve.protocol import OPENAI_FIELDS, ChatRequest, CompletionRequest, RequestError, error_for

if TYPE_CHECKING:
    from codestop.serve.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger("codestop.serve")

# a request's ``codestop`` field: the policies' knobs and the generation config's fields, from their registries
POLICY_FIELDS = frozenset({"method", *(k for knobs in METHOD_OPTIONS.values() for k in knobs)})
GENERATION_FIELDS = frozenset(f.name for f in cli_fields()) | frozenset(OLD_NAMES)  # an old name is read as its new one


# --------------------------------------------------------------------------------------------
# A request: its policy, config and prompt over the server's defaults
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    """What every request starts from, validated once, when the app is made."""

    config: GenerationConfig
    policy_options: Mapping[str, Any]  # a method and its knobs, as given: a request's knobs adjust these
    policy: Policy  # built from policy_options: what a request that asks for no policy gets
    served_model_name: tuple[str, ...] = ()  # the names the model is served under (none: the engine's)


def server_defaults(config: GenerationConfig, policy: Mapping[str, Any], served_model_name: str | Sequence[str] | None) -> Defaults:
    """The defaults, checked: the policy built once (a bad knob is a ParameterError naming it)."""
    names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name or ())
    require((served_model_name is None or bool(names)) and all(isinstance(n, str) and n for n in names),
            "served_model_name", served_model_name, "must be one or more non-empty names")
    return Defaults(config, dict(policy), make_policy(policy), tuple(dict.fromkeys(names)))


@dataclass(frozen=True)
class Prepared:
    """One validated request: what to run and how to answer."""

    chat: bool
    question: str
    prompt: str
    family: Family
    policy: Policy
    config: GenerationConfig
    stream: bool
    include_usage: bool
    rid: str
    model: str
    created: int


def split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A request's ``codestop`` field as (policy knobs, generation fields)."""
    options = options or {}
    for name, value in options.items():
        if name not in POLICY_FIELDS and name not in GENERATION_FIELDS:
            raise UnknownParameter(f"codestop.{name}", value, "is not a codestop option; known options: "
                                   f"{', '.join(sorted(POLICY_FIELDS | GENERATION_FIELDS - set(OLD_NAMES)))}")
    return ({k: v for k, v in options.items() if k in POLICY_FIELDS},
            {k: v for k, v in options.items() if k in GENERATION_FIELDS})


def request_config(request: ChatRequest | CompletionRequest, default: GenerationConfig, options: Mapping[str, Any]) -> GenerationConfig:
    """The default config with the request's OpenAI fields, then its ``codestop`` generation
    fields, applied; a raw completion ends at a stop (answer mode "none") unless those say; a
    streamed answer shows its text live."""
    answer = default.answer if isinstance(request, ChatRequest) else "none"
    config = default.replace(live_text=request.stream, answer=answer)
    for key, name in OPENAI_FIELDS.items():
        value = getattr(request, key)
        if value is not None:
            try:
                config = config.with_options({name: value})
            except ParameterError as err:  # named as the client named it
                raise ParameterError(key, value, err.must) from None
    return config.with_options(options, prefix="codestop.")


def served_models(engine: Engine, served_model_name: Sequence[str] = ()) -> list[str]:
    """The model names the proxy answers to: ``served_model_name`` where given (``--served-model-name``,
    as vLLM's), else the engine's one model, under the upstream's own name for a server engine (an
    upstream serving several is used for that one only: a request for another would otherwise be
    answered by the wrong model)."""
    if served_model_name:
        return list(served_model_name)
    return [engine.model_name] if engine.model_name else []


def check_model(model: str | None, engine: Engine, served_model_name: Sequence[str] = ()) -> str:
    """The model name to answer with: the one asked for, which the proxy must serve (404
    otherwise, as OpenAI's), or when none is asked for the first served name (the engine's own
    without ``served_model_name``)."""
    if model is None:
        return served_model_name[0] if served_model_name else engine.model_name
    names = served_models(engine, served_model_name)
    if model not in names:
        raise RequestError(f"model: the model {model!r} does not exist; this server serves {', '.join(names)}",
                           "model", 404, "model_not_found")
    return model


async def prepare(request: ChatRequest | CompletionRequest, engine: Engine, defaults: Defaults) -> Prepared:
    """A validated request made ready to run (a mistake in a value raises a ParameterError naming
    its field): its policy and config over ``defaults``, its prompt rendered: the client's
    conversation exactly as sent through the model's template (opened for thinking where the
    family thinks), or its raw prompt. ``engine`` is ready: its name, window and template are known."""
    chat = isinstance(request, ChatRequest)
    model = check_model(request.model, engine, defaults.served_model_name)
    knobs, generation = split_options(request.codestop)
    try:  # the asked knobs over the default policy's; errors named as the client named the knob
        policy = make_policy(knobs, base=defaults.policy_options) if knobs else defaults.policy
    except ParameterError as err:
        raise err.under("codestop.") from None
    config = request_config(request, defaults.config, generation)
    check_max_tokens(request, config, engine)
    family = get_family(config.family, engine, config.enable_thinking)
    if isinstance(request, ChatRequest):
        family = family.with_effort(request.reasoning_effort)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        if request.agent:  # the conversation as sent (tool calls, tool results) and the tools: codestop/serve/upstream_chat.py
            messages = [m.wire() for m in request.messages]
            family = replace(family, template_kwargs={**family.template_kwargs, "tools": request.tools}) if request.tools else family
        family, prompt = await render_messages(engine, family, messages)
    else:
        question = prompt = request.prompt
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return Prepared(chat, question, prompt, family, policy, config, request.stream, request.include_usage, rid, model, int(time.time()))


def check_max_tokens(request: ChatRequest | CompletionRequest, config: GenerationConfig, engine: Engine) -> None:
    """A ``max_tokens`` the model's context window cannot hold beside a prompt is a 400 (not
    silently lowered to what fits)."""
    window = engine.context_window
    if config.max_tokens is None or window is None or config.max_tokens < window:
        return
    key = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    raise ParameterError(key, config.max_tokens, f"is more than the model's context window ({window} tokens, "
                         f"prompt included) can hold; ask for fewer than {window}")


async def render_messages(engine: Engine, family: Family, messages: list[dict[str, Any]]) -> tuple[Family, str]:
    """The family as the conversation switches it (Family.open) and the conversation through the
    model's chat template; one the template refuses (a role or an order it does not render) is a
    400 naming ``messages``."""
    try:
        return cast(tuple[Family, str], await engine.run_tokenizer(family.open, engine, messages))
    except _template_errors() as err:
        raise RequestError(f"messages: the model's chat template cannot render them ({err})", "messages") from None


def _template_errors() -> tuple[type[Exception], ...]:
    try:
        from jinja2 import TemplateError
    except ImportError:  # no Jinja here: no template to refuse a conversation
        return ()
    return (TemplateError,)


# --------------------------------------------------------------------------------------------
# Splitting the output into reasoning_content and content
# --------------------------------------------------------------------------------------------


# markup a family's model writes at the start of a section, hidden like the thinking markers
SECTION_MARKUP: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt-oss": {"reasoning_content": ("<|channel|>analysis<|message|>",),
                "content": ("<|start|>assistant<|channel|>final<|message|>", "<|channel|>final<|message|>")},
}


class Splitter:
    """Routes the controller's text events to ``reasoning_content`` or ``content``.

    For a thinking family the reasoning ends at its ``think_end`` marker (hidden, possibly split
    over events), codestop's forced close (``close_thinking``) is hidden too, and so are the
    family's section markup and the blank lines that open the answer. For a plain family, or a raw
    completion, everything is ``content``, as the model wrote it.

    Why the marker is looked for here although the step scanner found it: the controller's events
    say when the reasoning ends, not where in its text the model's own ``think_end`` starts (the
    step keeps the token that completed it, with whatever else that token holds, and a stream may
    split it over events). The search covers only the held tail and the new text, and stops at the
    marker."""

    def __init__(self, family: Family, split: bool) -> None:
        self.split = split and family.thinks
        self.think_end = family.think_end
        self.close_thinking = family.close_thinking
        self.in_answer = not self.split
        self.held = ""
        self.first_answer = True
        self.markup = SECTION_MARKUP.get(family.name, {})
        self.started = {"reasoning_content": not self.split, "content": not self.split}
        self.opening = {"reasoning_content": "", "content": ""}  # a section's start, undecided yet

    def feed(self, kind: str, text: str) -> list[tuple[str, str]]:
        return [(where, t) for where, piece in self._route(kind, text) if (t := self._open(where, piece))]

    def _route(self, kind: str, text: str) -> list[tuple[str, str]]:
        if not self.split:
            return [("content", text)] if text else []
        out: list[tuple[str, str]] = []
        if kind == "answer":
            if self.held and not self.in_answer:
                out.append(("reasoning_content", self.held))
            self.held = ""
            self.in_answer = True
            if self.first_answer and self.close_thinking and text.startswith(self.close_thinking):
                text = text[len(self.close_thinking) :]
            self.first_answer = False
            return out + ([("content", text)] if text else [])
        if self.in_answer:
            return [("content", text)] if text else []
        buf = self.held + text
        at = buf.find(self.think_end)
        if at != -1:
            self.in_answer = True
            self.held = ""
            if buf[:at]:
                out.append(("reasoning_content", buf[:at]))
            rest = buf[at + len(self.think_end) :]
            return out + ([("content", rest)] if rest else [])
        keep = 0  # hold back a tail that may be the start of the marker
        for n in range(min(len(self.think_end) - 1, len(buf)), 0, -1):
            if self.think_end.startswith(buf[-n:]):
                keep = n
                break
        self.held = buf[len(buf) - keep :] if keep else ""
        emit = buf[: len(buf) - keep]
        return [("reasoning_content", emit)] if emit else []

    def _open(self, where: str, text: str) -> str:
        """``text`` once its section has started: the section's leading markup (and an answer's
        leading whitespace) dropped; "" while the start is still undecided."""
        if self.started[where]:
            return text
        buf = self.opening[where] + text
        marks = self.markup.get(where, ())
        while True:
            if where == "content":
                buf = buf.lstrip()
            hit = next((m for m in marks if buf.startswith(m)), None)
            if hit is None:
                break
            buf = buf[len(hit) :]
        if not buf or any(m.startswith(buf) for m in marks):
            self.opening[where] = buf
            return ""
        self.started[where], self.opening[where] = True, ""
        return buf

    def flush(self) -> list[tuple[str, str]]:
        held, self.held = self.held, ""
        out = [("content" if self.in_answer else "reasoning_content", held)] if held else []
        out = [(where, t) for where, piece in out if (t := self._open(where, piece))]
        for where in ("reasoning_content", "content"):  # a start that looked like markup but was not
            if self.opening[where]:
                out.append((where, self.opening[where]))
                self.opening[where] = ""
        return sorted(out, key=lambda item: item[0] == "content")


def split_result(result: Result, family: Family, split: bool) -> dict[str, str]:
    splitter = Splitter(family, split)
    parts = {"reasoning_content": "", "content": ""}
    for kind, text in (("reasoning", result.reasoning_text), ("answer", result.answer_text)):
        for where, piece in splitter.feed(kind, text):
            parts[where] += piece
    for where, piece in splitter.flush():
        parts[where] += piece
    return parts


# --------------------------------------------------------------------------------------------
# Response bodies
# --------------------------------------------------------------------------------------------


def usage_of(result: Result, family: Family) -> dict[str, Any]:
    """OpenAI's usage: the completion is the reasoning plus the answer (what ``max_tokens`` caps);
    ``reasoning_tokens`` the thinking block's (0 for a plain family); codestop's own figures, probes
    included, under ``codestop``. ``probes`` (the count, where everywhere else it is the list) and
    ``stop_position`` (always ``reasoning_tokens``) are written for one more release beside
    ``probe_count`` and ``reasoning_tokens`` (docs/vocabulary.md)."""
    t = result.tokens
    completion = t["reasoning"] + t["answer"]
    return {
        "prompt_tokens": t["prompt"],
        "completion_tokens": completion,
        "total_tokens": t["prompt"] + completion,
        "completion_tokens_details": {"reasoning_tokens": t["reasoning"] if family.thinks else 0},
        "codestop": {
            "policy": result.policy,
            "stop_reason": result.stop_reason,
            "stopped_early": result.stop_reason not in NOT_EARLY,
            "reasoning_tokens": t["reasoning"],
            "answer_tokens": t["answer"],
            "probe_tokens": t["probe"],
            "probe_prompt_tokens": t["probe_prompt"],
            "overrun_tokens": t.get("overrun", 0),
            "probe_count": len(result.probes),
            "steps": result.steps,
            "answer": result.answer,
            "cost_tokens": result.cost_tokens,
            "probes": len(result.probes),  # old name (a count), until the next release
            "stop_position": t["reasoning"],  # old name, until the next release
        },
    }


def finish_reason_of(result: Result, config: GenerationConfig) -> str:
    """``length`` when a cap, not the model or the policy, ended the output: the completion reached
    ``max_tokens``, or the reasoning reached its cap with no answer after it."""
    completion = result.tokens["reasoning"] + result.tokens["answer"]
    if config.max_tokens is not None and completion >= config.max_tokens:  # never an EOS: it would be one more
        return "length"
    if result.stop_reason == "max_reasoning_tokens" and result.tokens["answer"] == 0:
        return "length"
    return "stop"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def chunk(prep: Prepared, delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
    """A stream chunk: a delta (with its finish reason), or with ``delta`` None a chunk with no
    choice (the usage chunk)."""
    head = {"id": prep.rid, "object": "chat.completion.chunk" if prep.chat else "text_completion",
            "created": prep.created, "model": prep.model}
    if delta is None:
        return {**head, "choices": []}
    if prep.chat:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    text = delta.get("content", "") + delta.get("reasoning_content", "")
    return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


class SSEWriter:
    """The one writer of a streamed answer's SSE, for every kind of answer: the chat role chunk
    with the first output (or the end), the deltas, then the end (the finish chunk, the usage in a
    chunk of its own when asked for with ``stream_options.include_usage``, ``[DONE]``) or an error
    event. Each call returns the text to send; nothing is sent before the first output, so a
    failure before it can still be an HTTP error (``started`` says whether it was)."""

    MARK = "\u0000"  # JSON writes it as an escape, which no other part of a chunk holds

    def __init__(self, prep: Prepared) -> None:
        self.prep = prep
        self.started = False
        self.around: dict[str, list[str]] = {}  # a text delta's chunk, split where its text goes

    def _opening(self) -> str:
        if self.started:
            return ""
        self.started = True
        return sse(chunk(self.prep, {"role": "assistant", "content": ""})) if self.prep.chat else ""

    def texts(self, pieces: Sequence[tuple[str, str]]) -> str:
        """Text deltas (``reasoning_content`` or ``content``, what a :class:`Splitter` routes), byte
        for byte ``sse(chunk(prep, {where: text}))`` each: the chunk around the text is encoded once
        per section, only the text per delta (the hot path); "" for none."""
        out = "".join(self._text(where, text) for where, text in pieces)
        return self._opening() + out if out else ""

    def _text(self, where: str, text: str) -> str:
        around = self.around.get(where)
        if around is None:
            around = self.around[where] = sse(chunk(self.prep, {where: self.MARK})).split(json.dumps(self.MARK))
        if len(around) != 2:  # the mark elsewhere too (a model name holding it): the whole chunk
            return sse(chunk(self.prep, {where: text}))
        return around[0] + json.dumps(text, ensure_ascii=False) + around[1]

    def delta(self, delta: dict[str, Any]) -> str:
        """Any other delta (an upstream's ``tool_calls``)."""
        return self._opening() + sse(chunk(self.prep, delta))

    def end(self, finish: str, result: Result) -> str:
        """The stream's end: the finish reason, the usage when asked for, ``[DONE]``."""
        out = self._opening() + sse(chunk(self.prep, {}, finish))
        if self.prep.include_usage:
            out += sse({**chunk(self.prep, None), "usage": usage_of(result, self.prep.family)})
        return out + "data: [DONE]\n\n"

    def error(self, exc: Exception, state: Any) -> str:
        """A failure after the status line was sent, as the stream's last event; ``state.outcome``
        the status it would have had."""
        state.outcome, payload = error_for(exc, "messages" if self.prep.chat else "prompt")
        if state.outcome == 500:
            log.exception("answer failed mid-stream")
        return self._opening() + sse(payload)


def full_response(result: Result, prep: Prepared) -> dict[str, Any]:
    parts = split_result(result, prep.family, prep.chat)
    finish = finish_reason_of(result, prep.config)
    if prep.chat:
        message: dict[str, Any] = {"role": "assistant", "content": parts["content"]}
        if prep.family.thinks:
            message["reasoning_content"] = parts["reasoning_content"]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": parts["reasoning_content"] + parts["content"], "logprobs": None, "finish_reason": finish}
    return {"id": prep.rid, "object": "chat.completion" if prep.chat else "text_completion", "created": prep.created,
            "model": prep.model, "choices": [choice], "usage": usage_of(result, prep.family)}


async def sse_events(prep: Prepared, head: list[Event | Result], stream: AsyncGenerator[Event | Result, None],
                     metrics: Metrics, state: Any, writer: SSEWriter | None = None) -> AsyncGenerator[str, None]:
    """The SSE chunks of one streamed answer: ``head`` (already pulled), then the rest of
    ``stream``, written by ``writer`` (the Responses API's has events of its own; default: chat's
    or a completion's chunks). A failure after the first byte ends the stream with an error event.
    What one event gives goes in one write: each write to the client is a system call."""
    splitter = Splitter(prep.family, prep.chat)
    writer = SSEWriter(prep) if writer is None else writer
    async with aclosing(stream):
        try:
            async for item in chain(head, stream):
                if isinstance(item, Result):
                    out = writer.texts(splitter.flush()) + writer.end(finish_reason_of(item, prep.config), item)
                    metrics.count_result(item)
                    yield out
                    state.outcome = 200
                elif item.kind in ("reasoning", "answer"):
                    if out := writer.texts(splitter.feed(item.kind, item.text)):
                        yield out
        except Exception as exc:  # the status line is sent: the error goes in the stream
            yield writer.error(exc, state)


async def chain(head: list[T], rest: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """The items of ``head``, then those of ``rest``."""
    for item in head:
        yield item
    async for item in rest:
        yield item


async def result_of(stream: AsyncGenerator[Event | Result, None]) -> Result:
    """``stream`` consumed to its Result (and closed)."""
    async with aclosing(stream):
        async for item in stream:
            if isinstance(item, Result):
                return item
    raise RuntimeError("the answer's stream ended without a Result")  # pragma: no cover - astream always ends with one


async def pull_head(stream: AsyncGenerator[Event | Result, None]) -> list[Event | Result]:
    """The stream's items up to its first text (or its Result): a failure before any output is
    still an HTTP error. The stream is closed if this fails or is cancelled."""
    head: list[Event | Result] = []
    try:
        async for item in stream:
            head.append(item)
            if isinstance(item, Result) or item.text:
                break
    except BaseException:
        await stream.aclose()
        raise
    return head
