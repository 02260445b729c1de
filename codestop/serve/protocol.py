"""The OpenAI wire format the proxy speaks: typed request models for ``/v1/chat/completions`` and
``/v1/completions``, and OpenAI's error shape.

A request body is checked here once for its shape and JSON types (pydantic, strict: ``"7"`` is no
number, ``true`` no integer); its values are checked where they are defined, by
:class:`~codestop.config.GenerationConfig` and the policies, which raise
:class:`~codestop.errors.ParameterError`. Either error becomes a 400 whose ``param`` comes from the
error itself (a pydantic error's location, a ParameterError's ``param``), as vLLM's do.

Every field is honoured, harmless, or refused with a 400 naming it, never accepted and ignored: an
unknown field is ``unknown_parameter``; an OpenAI field the proxy cannot honour (``n > 1``,
``logprobs``, ...) is accepted at its neutral value (what the official clients send when nothing is
asked) and else ``unsupported_parameter``. A top-level ``null`` means the field is unset, as in
OpenAI's API (some clients send every unset field as null), except for the prompt or messages, which
a request cannot go without. A string holding a lone UTF-16 surrogate is no text: a 400 naming it. A chat request's agent fields (``AGENT_FIELDS``: tools,
a response format) are honoured by :mod:`codestop.serve.upstream_chat`; a raw completion still refuses them.
"""

# no "from __future__ import annotations": pydantic reads the fields' annotations at runtime
import re
from typing import Any, ClassVar, cast

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from codestop.errors import CodestopError, ContextTooLong, ParameterError, ServerBusy, ServerError, UpstreamRejected, UpstreamUnauthorized, redact, require

MAX_STOPS = 4  # as OpenAI's API
ROLES = ("system", "user", "assistant", "developer", "tool")  # the message roles a request may use
# The OpenAI fields the proxy honours: the GenerationConfig field each sets (later ones win).
OPENAI_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                 "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "stop": "stop"}
# A chat request's fields for agents, passed to the upstream's chat endpoint for the answer phase
# (codestop/serve/upstream_chat.py); refused on /v1/completions like the fields below.
AGENT_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICES = ("none", "auto", "required")
# OpenAI's reasoning efforts; a family with a notion of effort honours those it knows (Family.with_effort)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# Refused unless at their neutral value (None always is): (neutral values, why)
UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "one choice per request"),
    "best_of": ((1,), "one choice per request"),
    "echo": ((False,), "the prompt is not echoed"),
    "suffix": (("",), "no suffix insertion"),
    "logprobs": ((False,), "the answer's log-probabilities are not returned"),
    "top_logprobs": ((0,), "the answer's log-probabilities are not returned"),
    "logit_bias": (({},), "no logit bias"),
    "tools": (([],), "no tool calling"),
    "tool_choice": (("none",), "no tool calling"),
    "functions": (([],), "no function calling"),
    "function_call": (("none",), "no function calling"),
    "response_format": (({"type": "text"},), "no structured output"),
    "presence_penalty": ((0, 0.0), "no penalties on the reasoning steps"),
    "frequency_penalty": ((0, 0.0), "no penalties on the reasoning steps"),
}


# --------------------------------------------------------------------------------------------
# Errors, in OpenAI's shape
# --------------------------------------------------------------------------------------------


class RequestError(CodestopError):
    """A request the proxy refuses for what it is, not for one field's value (a model it does not
    serve, a body too large, a missing key, an engine not ready): HTTP ``status`` with an
    OpenAI-style error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind


class Unsupported(ParameterError):
    """An OpenAI field the proxy cannot honour, given at a value that asks for it."""

    code = "unsupported_parameter"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; a credential in the message (an upstream's text) is redacted."""
    return {"error": {"message": redact(message), "type": kind, "param": param, "code": code}}


def error_for(exc: BaseException, prompt_param: str = "messages", where: str = "") -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-style body for an exception raised while answering; ``where`` is
    the request's method and path (for an unknown route)."""
    from starlette.exceptions import HTTPException

    if isinstance(exc, RequestError):
        return exc.status, error_body(str(exc), exc.kind, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        param, message, code = validation_error(exc)
        return 400, error_body(message, "invalid_request_error", param, code)
    if isinstance(exc, ParameterError):
        return 400, error_body(str(exc), "invalid_request_error", exc.param, getattr(exc, "code", None))
    if isinstance(exc, ContextTooLong):
        return 400, error_body(str(exc), "invalid_request_error", prompt_param, "context_length_exceeded")
    if isinstance(exc, UpstreamRejected):  # the client's request, refused by the upstream in its words
        return exc.status, error_body(str(exc), "invalid_request_error", None, "upstream_rejected")
    if isinstance(exc, ServerError):
        if isinstance(exc, ServerBusy):
            return exc.status, error_body(str(exc), "upstream_error", None, "busy")
        if isinstance(exc, UpstreamUnauthorized):  # the proxy's own key: the operator's to fix
            return exc.status, error_body(str(exc), "upstream_error", None, "upstream_unauthorized")
        code = {503: "upstream_not_ready", 504: "upstream_timeout"}.get(exc.status, "upstream_unavailable")
        return exc.status, error_body(str(exc), "upstream_error", None, code)
    if isinstance(exc, CodestopError):
        return 400, error_body(str(exc), "invalid_request_error")
    if isinstance(exc, HTTPException):
        message = {404: f"Invalid URL ({where})", 405: f"Method not allowed ({where})"}.get(exc.status_code, str(exc.detail))
        return exc.status_code, error_body(message, "invalid_request_error", None,
                                           {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
    return 500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")


def validation_error(err: ValidationError) -> tuple[str, str, str | None]:
    """(param, message, code) of a request model's first error, an unknown field's first: ``param``
    is where pydantic found it (``messages[0].role``), the message says what the value must be."""
    first = min(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first["loc"]).lstrip(".") or "body"
    if first["type"] == "extra_forbidden":
        prompt = "messages" if err.title == ChatRequest.__name__ else "prompt"
        agents = f"{', '.join(AGENT_FIELDS)}, reasoning_effort, " if prompt == "messages" else ""
        return param, f"{param}: unrecognized request argument (the codestop proxy honours {prompt}, " \
                      f"{', '.join(OPENAI_FIELDS)}, {agents}and codestop)", "unknown_parameter"
    if first["type"] == "missing":
        return param, f"{param}: required", None
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ParameterError):  # a validator's own check: its words, where it sits
        return param, f"{param}: {short(cause.value)} {cause.must}", getattr(cause, "code", None)
    must = first["msg"].replace("Input should be", "must be", 1).split(" or instance of ")[0]  # no class names
    return param, f"{param}: {short(first['input'])} {must}", None


def short(value: Any, limit: int = 100) -> str:
    """``repr(value)``, cut to ``limit`` characters (a wrong value may be a whole document)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)  # OpenAI's other stream options change nothing here

    include_usage: bool = False


class Message(BaseModel):
    """A chat message: its role and its text; an agent's turns carry their tool calls and the id of
    the call a tool's result answers (rendered and passed upstream in agents' requests only; other
    keys are not rendered)."""

    model_config = ConfigDict(strict=True, frozen=True)

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def wire(self) -> dict[str, Any]:
        """The message as sent to a chat template or an upstream chat endpoint (unset keys left out)."""
        return self.model_dump(exclude_none=True)

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        require(role in ROLES, "role", role, f"is not a role the codestop proxy renders; use one of {', '.join(ROLES)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> Any:
        """A string, nothing, or OpenAI's list of text parts, as one string."""
        if content is None:
            return ""
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            require(len(texts) == len(content) and all(isinstance(t, str) for t in texts), "content", content,
                    'must be a string or a list of text parts ({"type": "text", "text": ...}): only text is supported')
            return "".join(cast(list[str], texts))
        return content


class OpenAIRequest(BaseModel):
    """The fields both endpoints take: honoured, harmless, or refused unless neutral."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    codestop: dict[str, Any] | None = None  # a policy and its knobs, generation fields: checked where they are defined
    # honoured (OPENAI_FIELDS)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    # harmless: they change nothing in the answer (tags, caching and storage hints)
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    # refused unless neutral (UNSUPPORTED_FIELDS)
    n: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    honoured: ClassVar[frozenset[str]] = frozenset()  # the UNSUPPORTED_FIELDS this endpoint honours

    @field_validator(*UNSUPPORTED_FIELDS)
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls.honoured:
            return check_agent_field(str(info.field_name), value, info.data)
        neutral, why = UNSUPPORTED_FIELDS[str(info.field_name)]
        if value is None or any(type(value) is type(v) and value == v for v in neutral):  # True is no 1
            return value
        raise Unsupported(str(info.field_name), value, f"is not supported by the codestop proxy ({why})")

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        """OpenAI's ``stop``: a string or a list of at most four (non-empty) strings."""
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        require(isinstance(stops, list) and all(isinstance(x, str) and x for x in stops), "stop", value,
                f"must be a non-empty string or a list of up to {MAX_STOPS} of them")
        require(len(stops) <= MAX_STOPS, "stop", value, f"holds {len(stops)} stop strings; at most {MAX_STOPS} are allowed")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(OpenAIRequest):
    honoured = frozenset({"tools", "tool_choice", "response_format"})

    messages: list[Message]
    # a chat template's effort (gpt-oss's "Reasoning: high"); elsewhere it changes nothing (docs/serving.md)
    reasoning_effort: str | None = None

    @field_validator("reasoning_effort")
    @classmethod
    def _effort(cls, effort: str | None) -> str | None:
        require(effort is None or effort in REASONING_EFFORTS, "reasoning_effort", effort,
                f"must be one of {', '.join(REASONING_EFFORTS)}")
        return effort

    @field_validator("messages")
    @classmethod
    def _some(cls, messages: list[Message]) -> list[Message]:
        require(bool(messages), "messages", messages, "must be a non-empty list of {role, content}")
        return messages

    @field_validator("parallel_tool_calls")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        require(value is None or isinstance(value, bool), "parallel_tool_calls", value, "must be true or false")
        return value

    @property
    def agent(self) -> bool:
        """Whether the answer phase goes to the upstream's chat endpoint: tools to call, or a
        response format other than text (codestop/serve/upstream_chat.py)."""
        fmt = self.response_format
        return bool(self.tools) or (fmt is not None and fmt.get("type") != "text")

    def agent_fields(self) -> dict[str, Any]:
        """The agent fields the client set, as the upstream's chat endpoint takes them."""
        return {k: v for k in AGENT_FIELDS if (v := getattr(self, k)) is not None}


class CompletionRequest(OpenAIRequest):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        require(isinstance(prompt, str) and bool(prompt), "prompt", prompt, "must be a non-empty string (one prompt per request)")
        return prompt


def check_agent_field(name: str, value: Any, earlier: dict[str, Any]) -> Any:
    """The shape of an agent field (OpenAI's); what a tool's schema says is the upstream's to check.
    ``earlier``: the fields validated before it (a tool choice needs tools)."""
    if value is None:
        return value
    if name == "tools":
        require(isinstance(value, list) and all(isinstance(t, dict) and t.get("type") == "function"
                                                and isinstance(t.get("function"), dict)
                                                and isinstance(t["function"].get("name"), str) for t in value),
                "tools", value, 'must be a list of {"type": "function", "function": {"name": ..., "parameters": ...}}')
    elif name == "tool_choice":
        named = isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str)
        require(value in TOOL_CHOICES or named, "tool_choice", value,
                f'must be one of {", ".join(TOOL_CHOICES)} or {{"type": "function", "function": {{"name": ...}}}}')
        require(value == "none" or bool(earlier.get("tools")), "tool_choice", value, "needs tools to choose from (tools is empty)")
    else:  # response_format
        require(isinstance(value, dict) and value.get("type") in RESPONSE_FORMATS, "response_format", value,
                f'must be {{"type": ...}} with a type among {", ".join(RESPONSE_FORMATS)}')
        require(value["type"] != "json_schema" or isinstance(value.get("json_schema"), dict), "response_format", value,
                'must carry "json_schema": {"name": ..., "schema": {...}} when its type is json_schema')
    return value


def parse_request(body: Any, chat: bool) -> ChatRequest | CompletionRequest:
    """A request body as its endpoint's model; a ValidationError (a 400 naming the field) if it is
    not one. A field set to null is unset, unless the request needs it (its prompt or messages: a
    null there is refused as the wrong type it is)."""
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object", "body")
    model = ChatRequest if chat else CompletionRequest
    check_text(body)
    needed = {name for name, f in model.model_fields.items() if f.is_required()}
    return model.model_validate({k: v for k, v in body.items() if v is not None or k in needed})


def check_text(value: Any, param: str = "") -> None:
    """A ParameterError naming the first string (or object key) in ``value`` that holds a lone UTF-16
    surrogate (JSON's ``"\\ud800"``): no UTF-8 encodes it, so no tokenizer or upstream can take it.
    ``value`` is a parsed body, nested at most MAX_JSON_DEPTH levels (the app checked)."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ParameterError(param or "body", value if len(value) <= 60 else value[:57] + "...", "holds a lone UTF-16 surrogate, which is no Unicode text "
                                 "(a surrogate must be half of a pair)")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, param or "body")
            check_text(item, f"{param}.{key}" if param else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{param}[{i}]")


_SURROGATE = re.compile("[\ud800-\udfff]")
