"""OpenAI's Responses API (``POST /v1/responses``) as a thin layer over the chat completions path:
a Responses request is translated into a :class:`~codestop.serve.protocol.ChatRequest` (the input
items as messages, ``instructions`` as the system message, ``max_output_tokens``, ``reasoning.effort``,
``text.format`` as ``response_format``, function tools as chat tools), answered exactly as a chat
request is (policy, shadow, guard, audits, the agents' path through the upstream's chat endpoint),
and its answer shaped back: the reasoning as a ``reasoning`` output item (its text in ``content``
as ``reasoning_text``; ``summary`` stays empty: nothing summarizes it), the answer as a ``message``
item, each tool call as a ``function_call`` item, and ``usage`` in the Responses' names with
``usage.codestop`` as chat's. Streamed, the same through :class:`ResponsesWriter`, the SSE writer
the chat stream uses with the Responses' events (``response.created`` ... ``response.completed``).

The proxy is stateless: it stores no response. ``previous_response_id`` and ``conversation`` (which
need stored state) and ``background`` are a 400 telling the client to send the whole conversation
in ``input``; ``store`` is accepted either way and every response says ``"store": false`` (OpenAI's
default is true, so clients send it; nothing can be fetched back later either way). Fields follow
the protocol's rule: honoured, harmless, or refused with a 400 naming them.
"""

# no "from __future__ import annotations": pydantic reads the fields' annotations at runtime
import logging
import uuid
from dataclasses import replace
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, ValidationError

from codestop.controller import Result
from codestop.engines.base import Engine
from codestop.errors import ParameterError, require
from codestop.serve import serving
from codestop.serve.protocol import (
    REASONING_EFFORTS,
    ROLES,
    ChatRequest,
    CompletionRequest,
    RequestError,
    Unsupported,
    check_text,
    error_for,
    parse_request,
    validation_error,
)
from codestop.serve.serving import Defaults, Prepared, SSEWriter, sse, usage_of

log = logging.getLogger("codestop.serve")

# the chat request's names for what the client named otherwise (an error names the client's field)
CHAT_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
              "reasoning_effort": "reasoning.effort", "response_format": "text.format"}
STATELESS = "the codestop proxy stores no responses; send the whole conversation (the earlier output items included) in input"
# Refused unless at their neutral value (None always is): (neutral values, why)
UNSUPPORTED = {
    "previous_response_id": ((), STATELESS),
    "conversation": ((), STATELESS),
    "background": ((False,), "answers are not kept for polling; ask with stream or wait for the answer"),
    "prompt": ((), "no stored prompt templates; send the prompt in input"),
    "include": (([],), "nothing extra to include: the reasoning is in plain text, with no log-probabilities"),
    "truncation": (("disabled",), "the input is never truncated; one too long for the model is a 400"),
    "top_logprobs": ((0,), "the answer's log-probabilities are not returned"),
    "max_tool_calls": ((), "no hosted tools; bound function calls in the client's loop"),
    "context_management": ((), "no server-side compaction"),
}
PARTS = ("input_text", "output_text", "text")  # the content parts that are text


class ResponsesRequest(BaseModel):
    """A Responses request's shape; its values are checked where the chat request checks them."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool = False
    codestop: dict[str, Any] | None = None
    # honoured
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: dict[str, Any] | None = None  # effort; summary accepted: the reasoning is in the item's content
    text: dict[str, Any] | None = None  # format
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # harmless
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    user: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    stream_options: Any = None
    # refused unless neutral (UNSUPPORTED)
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    prompt: Any = None
    include: Any = None
    truncation: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    context_management: Any = None


def parse(body: Any) -> tuple[ResponsesRequest, ChatRequest]:
    """A Responses body, checked, and the chat request it asks for; a 400 naming the client's field."""
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object", "body")
    check_text(body)
    try:
        request = ResponsesRequest.model_validate({k: v for k, v in body.items() if v is not None or k == "input"})
    except ValidationError as err:
        param, message, code = validation_error(err)
        if code == "unknown_parameter":
            message = f"{param}: unrecognized request argument (the codestop proxy's /v1/responses honours input, instructions, " \
                      "max_output_tokens, temperature, top_p, reasoning, text, tools, tool_choice, parallel_tool_calls and codestop)"
        raise RequestError(message, param, 400, code) from None
    for name, (neutral, why) in UNSUPPORTED.items():
        value = getattr(request, name)
        if value is not None and not any(type(value) is type(v) and value == v for v in neutral):
            raise Unsupported(name, value, f"is not supported by the codestop proxy ({why})")
    try:
        return request, cast(ChatRequest, parse_request(chat_body(request), chat=True))
    except ValidationError as err:
        param, message, code = validation_error(err)
        raise RequestError(renamed(message), renamed(param), 400, code) from None
    except ParameterError as err:
        raise type(err)(renamed(err.param), err.value, err.must) from None


def renamed(param: str) -> str:
    """A chat field's name (at the start of ``param`` or a message) as the Responses request names it."""
    for chat, ours in CHAT_NAMES.items():
        if param.startswith(chat) and not param[len(chat):len(chat) + 1].isalnum():
            return ours + param[len(chat):]
    return param


def chat_body(request: ResponsesRequest) -> dict[str, Any]:
    """The chat completions body a Responses request asks for."""
    reasoning, text = request.reasoning or {}, request.text or {}
    require(set(reasoning) <= {"effort", "summary", "generate_summary"}, "reasoning", reasoning, "takes effort and summary")
    require(reasoning.get("effort") is None or reasoning["effort"] in REASONING_EFFORTS, "reasoning.effort",
            reasoning.get("effort"), f"must be one of {', '.join(REASONING_EFFORTS)}")
    require(set(text) <= {"format", "verbosity"}, "text", text, "takes format and verbosity")
    require(text.get("verbosity") in (None, "medium"), "text.verbosity", text.get("verbosity"),
            "is not supported by the codestop proxy (the model's own verbosity: medium)")
    messages = ([{"role": "system", "content": request.instructions}] if request.instructions else []) + input_messages(request.input)
    return {"model": request.model, "messages": messages, "stream": request.stream, "codestop": request.codestop,
            "max_completion_tokens": request.max_output_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "reasoning_effort": reasoning.get("effort"), "response_format": response_format(text.get("format")),
            "tools": chat_tools(request.tools), "tool_choice": chat_tool_choice(request.tool_choice),
            "parallel_tool_calls": request.parallel_tool_calls, "metadata": request.metadata, "user": request.user}


def input_messages(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as chat messages: a string is the user's message; items are messages, a function
    call (its assistant message's ``tool_calls``) or its output (a ``tool`` message). A reasoning
    item is left out, as chat templates leave out earlier turns' thinking."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    require(bool(given), "input", given, "must be a string or a non-empty list of items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        if kind == "message":  # checked here: its index in the chat's messages is not the client's
            require(item.get("role") in ROLES, f"input[{i}].role", item.get("role"), f"must be one of {', '.join(ROLES)}")
            messages.append({"role": item["role"], "content": content_text(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # one assistant turn: its text and its calls
                last["tool_calls"] = [*last.get("tool_calls", []), call]
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else content_text(output, f"input[{i}].output")})
        elif kind != "reasoning":
            raise Unsupported(f"input[{i}].type", kind, "is not supported by the codestop proxy (messages, function_call, "
                                                         "function_call_output and reasoning items are)")
    return messages


def content_text(content: Any, param: str) -> Any:
    """A message's content as one string: a string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in PARTS and isinstance(p.get("text"), str) for p in content)
    require(texts, param, content, 'must be a string or a list of text parts ({"type": "input_text", "text": ...}): only text is supported')
    return "".join(p["text"] for p in content)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools in chat's shape; any other kind (hosted tools) is a 400."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise Unsupported(f"tools[{i}].type", tool.get("type"), "is not supported by the codestop proxy (function tools are; it runs no hosted tools)")
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type" and v is not None}})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(fmt: Any) -> Any:
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return fmt


async def prepare(chat: ChatRequest | CompletionRequest, engine: Engine, defaults: Defaults) -> Prepared:
    """The chat request prepared as any is (a mistake named as the Responses request names it),
    under a response's id."""
    try:
        prep = await serving.prepare(chat, engine, defaults)
    except ParameterError as err:
        raise type(err)(renamed(err.param), err.value, err.must) from None
    return replace(prep, rid=item_id("resp"))


# --------------------------------------------------------------------------------------------
# Answers: the response object, and its stream of events
# --------------------------------------------------------------------------------------------


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat's usage in the Responses' names, ``codestop`` as chat's."""
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": chat_usage["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": chat_usage["total_tokens"], "codestop": chat_usage["codestop"]}


def response_object(request: ResponsesRequest, prep: Prepared, status: str, output: list[dict[str, Any]],
                    chat_usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The response: what was asked echoed (as OpenAI's), the output items, the status and usage."""
    return {"id": prep.rid, "object": "response", "created_at": prep.created, "status": status, "background": False,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens, "model": prep.model,
            "output": output, "parallel_tool_calls": request.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": (request.reasoning or {}).get("effort"), "summary": None}, "store": False,
            "temperature": request.temperature, "text": {"format": (request.text or {}).get("format") or {"type": "text"}},
            "tool_choice": request.tool_choice or "auto", "tools": request.tools or [], "top_p": request.top_p,
            "truncation": "disabled", "usage": None if chat_usage is None else usage(chat_usage), "user": request.user,
            "metadata": request.metadata or {}}


def status_of(finish: str) -> str:
    return "incomplete" if finish == "length" else "completed"


def reasoning_item(text: str, status: str = "completed", rid: str | None = None) -> dict[str, Any]:
    return {"id": rid or item_id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, status: str = "completed", rid: str | None = None) -> dict[str, Any]:
    return {"id": rid or item_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed", rid: str | None = None) -> dict[str, Any]:
    return {"id": rid or item_id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def from_chat(completion: dict[str, Any], request: ResponsesRequest, prep: Prepared) -> dict[str, Any]:
    """A chat completion (the proxy's own, or the agents' path's) as the response."""
    choice = completion["choices"][0]
    message, status = choice["message"], status_of(choice["finish_reason"])
    output = [reasoning_item(message["reasoning_content"])] if message.get("reasoning_content") else []
    calls = message.get("tool_calls") or []
    if message.get("content") or not (calls or output):  # no empty message beside other items (as the stream)
        output.append(message_item(message.get("content") or "", status))
    output += [call_item(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]
    return response_object(request, prep, status, output, completion["usage"])


class ResponsesWriter(SSEWriter):
    """The SSE writer of a streamed response, in the Responses' events: ``response.created`` and
    ``response.in_progress`` with the first output, each output item opened
    (``response.output_item.added``, ``response.content_part.added``), its deltas
    (``response.reasoning_text.delta``, ``response.output_text.delta``,
    ``response.function_call_arguments.delta``), closed (``...done``), then ``response.completed``
    (``response.incomplete`` when ``max_output_tokens`` ended it) with the whole response and its
    usage; a failure after the first output is an ``error`` event. Each event is framed as
    :func:`~codestop.serve.serving.sse` frames a chunk, with its ``event:`` line."""

    def __init__(self, prep: Prepared, request: ResponsesRequest) -> None:
        super().__init__(prep)
        self.request = request
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the items so far; the last may be open
        self.open: str | None = None  # the open item's kind: "reasoning_content", "content" or a call's index
        self.text = ""  # the open item's text (a call's arguments)

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n" + sse(payload)

    def _opening(self) -> str:
        if self.started:
            return ""
        self.started = True
        response = response_object(self.request, self.prep, "in_progress", [])
        return self.event("response.created", response=response) + self.event("response.in_progress", response=response)

    def _item(self, where: str, item: dict[str, Any] | None = None) -> str:
        """The item for ``where`` open: the open one if it is, else the open one closed and a new one."""
        if self.open == where:
            return ""
        out = self._close()
        if item is None:
            item = (reasoning_item if where == "reasoning_content" else message_item)("", "in_progress")
        self.output.append(item)
        self.open, self.text, index = where, "", len(self.output) - 1
        out += self.event("response.output_item.added", output_index=index, item=item)
        if item["type"] != "function_call":
            part = {**item["content"][0]}
            out += self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part)
        return out

    def _close(self, status: str = "completed") -> str:
        if self.open is None:
            return ""
        index, item, text = len(self.output) - 1, self.output[-1], self.text
        self.open = None
        at = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            item.update(arguments=text, status="completed")
            out = self.event("response.function_call_arguments.done", **at, name=item["name"], arguments=text)
        else:
            item["status"] = "completed" if item["type"] == "reasoning" else status
            part = item["content"][0]
            part["text"] = text
            kind = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra: dict[str, Any] = {"logprobs": []} if item["type"] == "message" else {}
            out = self.event(kind, **at, content_index=0, text=text, **extra)
            out += self.event("response.content_part.done", **at, content_index=0, part=part)
        return out + self.event("response.output_item.done", output_index=index, item=item)

    def texts(self, pieces: Any) -> str:
        out = ""
        for where, text in pieces:
            out += self._opening() + self._item(where)
            self.text += text
            at = {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1, "content_index": 0}
            if where == "reasoning_content":
                out += self.event("response.reasoning_text.delta", **at, delta=text)
            else:
                out += self.event("response.output_text.delta", **at, delta=text, logprobs=[])
        return out

    def delta(self, delta: dict[str, Any]) -> str:
        """An upstream's chat delta (the agents' path): its text, and its tool calls as function calls."""
        out = self.texts([(k, delta[k]) for k in ("reasoning_content", "content") if delta.get(k)])
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            where = f"call {call.get('index', 0)}"
            if self.open != where:
                item = call_item(call.get("id") or item_id("call"), function.get("name") or "", "", "in_progress")
                out += self._opening() + self._item(where, item)
            if arguments := function.get("arguments"):
                self.text += arguments
                out += self.event("response.function_call_arguments.delta", item_id=self.output[-1]["id"],
                                  output_index=len(self.output) - 1, delta=arguments)
        return out

    def end(self, finish: str, result: Result) -> str:
        status = status_of(finish)
        out = self._opening()
        if not self.output:  # no output at all: an empty answer is still a message
            out += self._item("content")
        out += self._close(status)
        response = response_object(self.request, self.prep, status, self.output, usage_of(result, self.prep.family))
        return out + self.event(f"response.{status}", response=response)

    def error(self, exc: Exception, state: Any) -> str:
        state.outcome, payload = error_for(exc, "input")
        if state.outcome == 500:
            log.exception("answer failed mid-stream")
        error = payload["error"]
        return self._opening() + self.event("error", code=error["code"] or error["type"], message=error["message"], param=error["param"])
