"""``codestop serve``: an OpenAI-compatible HTTP server that applies a stopping policy to every
request, in front of a completions server (vLLM, SGLang, llama.cpp) or an in-process engine.

Clients talk to it as to any OpenAI endpoint (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``; streaming or not). The reasoning comes back in ``reasoning_content`` (as vLLM's
reasoning parsers put it) and the answer in ``content``; the policy is chosen per request with an
extra body field, ``{"codestop": {"method": "codestop", "tau": 7}}``, over the server-wide default;
``usage`` carries codestop's own figures under ``usage.codestop``. Without ``proxy_api_key``
everything is open; with one, only ``/health``'s bare status is: its details, ``/metrics``
(Prometheus) and everything under ``/v1`` ask for the key, and the API docs are off. The
upstream's error text never reaches ``/health`` unauthenticated, and a credential in it is redacted
wherever it is relayed. A request body over ``max_request_bytes`` is a 413.

What a client sent is honoured or refused, never dropped: ``max_tokens`` caps reasoning plus answer,
``stop`` ends the visible output, the messages are rendered exactly as sent, a model the upstream
does not serve is a 404, and a field the proxy cannot honour (tools, logprobs, n > 1, ...) is a 400
naming it. Nothing is appended to what the model says unless asked: when a policy stops a chat
answer's thinking, the model closes it and answers in its own words (``answer: "free"``); a raw
completion just ends (``"none"``); the paper's forced ``\\boxed{}`` answer is ``"boxed"``.

Each answer is one :func:`codestop.controller.astream`: a streaming response turns its events into
SSE chunks, a plain one consumes it to the Result. Closing the stream closes its session, so a
client that leaves stops its generation. The engine may be built at startup in the background (a
model loading, an upstream still starting): until it answers, ``/health`` and requests are 503.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at runtime
import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from codestop.config import ANSWER_MODES, GenerationConfig, cli_fields
from codestop.controller import Event, Result, agenerate, astream
from codestop.engines.base import Engine
from codestop.errors import CodestopError, ContextTooLong, ServerError, redact
from codestop.families import Family, get_family
from codestop.policies import METHOD_OPTIONS, Policy, make_policy

T = TypeVar("T")
log = logging.getLogger("codestop.serve")

DEFAULT_CONFIG = GenerationConfig()
DEFAULT_POLICY: Mapping[str, Any] = {"method": "codestop"}
DEFAULT_ANSWER = "free"  # a chat answer after a stop: the model's own words (a raw completion: "none")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}  # what /metrics counts
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
DISCONNECT_POLL_S = 0.25  # how often a plain request checks that its client is still there
# a request's ``codestop`` field: the policies' knobs and the generation config's fields, from their registries
POLICY_FIELDS = frozenset({"method", *(k for knobs in METHOD_OPTIONS.values() for k in knobs)})
GENERATION_FIELDS = frozenset(f.name for f in cli_fields())
# The OpenAI request fields, each honoured, harmless or refused; any other field is a 400.
# Honoured: the GenerationConfig field each sets (later ones win).
OPENAI_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                 "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "stop": "stop"}
HARMLESS_FIELDS = frozenset({"model", "stream", "stream_options", "user", "metadata", "store", "service_tier",
                             "parallel_tool_calls", "codestop"})
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
MAX_STOPS = 4  # as OpenAI's API
ROLES = ("system", "user", "assistant", "developer", "tool")  # the message roles a request may use
MAX_JSON_DEPTH = 64  # the deepest nesting of a request body (OpenAI's bodies nest a few levels)
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # the largest request body, by default (8 MiB)
# --------------------------------------------------------------------------------------------
# Errors, in OpenAI's shape
# --------------------------------------------------------------------------------------------


class RequestError(CodestopError):
    """A client's mistake: HTTP ``status`` with an OpenAI-style error naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nobody reads the response (499)."""


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; a credential in the message (an upstream's text) is redacted."""
    return {"error": {"message": redact(message), "type": kind, "param": param, "code": code}}


def error_for(exc: BaseException, prompt_param: str = "messages", where: str = "") -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-style body for an exception raised while answering; ``where`` is
    the request's method and path (for an unknown route)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, RequestError):
        return exc.status, error_body(str(exc), exc.kind, exc.param, exc.code)
    if isinstance(exc, ContextTooLong):
        return 400, error_body(str(exc), "invalid_request_error", prompt_param, "context_length_exceeded")
    if isinstance(exc, ServerError):
        code = {503: "upstream_not_ready", 504: "upstream_timeout"}.get(exc.status, "upstream_unavailable")
        return exc.status, error_body(str(exc), "upstream_error", None, code)
    if isinstance(exc, CodestopError):
        return 400, error_body(str(exc), "invalid_request_error")
    if isinstance(exc, RequestValidationError):
        first = (exc.errors() or [{}])[0]
        param_path = ".".join(str(x) for x in first.get("loc", ())[1:])
        return 400, error_body(f"{param_path or 'body'}: {first.get('msg', 'invalid')}", "invalid_request_error", param_path or None)
    if isinstance(exc, HTTPException):
        message = {404: f"Invalid URL ({where})", 405: f"Method not allowed ({where})"}.get(exc.status_code, str(exc.detail))
        return exc.status_code, error_body(message, "invalid_request_error", None,
                                           {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
    return 500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")


def _param(message: str) -> str | None:
    """The field a validation message names ("tau: -1 must be ..." -> "tau")."""
    head, colon, _ = message.partition(":")
    return head if colon and " " not in head else None


# --------------------------------------------------------------------------------------------
# Metrics (prometheus_client, one registry per app)
# --------------------------------------------------------------------------------------------


def counter_labels(key: str | tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The labels of one of ``engine.counters()``'s keys: a string is the ``kind`` ("" for none),
    a tuple of (label, value) pairs names its own (several replicas: ``kind`` and ``replica``)."""
    return dict(key) if isinstance(key, tuple) else ({"kind": key} if key else {})


class EngineCounters:
    """Exports ``engine.counters()`` (``{name: {kind: n}}``) as ``codestop_<name>_total{kind}``
    (other labels where a key is a tuple of label pairs, see :func:`counter_labels`), read at each
    scrape so the engine keeps its own counts (none while the engine is being built)."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []  # unknown until scraped: do not call the engine at registration

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        engine = self.engine()
        if engine is None:
            return
        for name, by_key in sorted(engine.counters().items()):
            series = [(counter_labels(key), n) for key, n in by_key.items()]
            names = list(dict.fromkeys(label for labels, _ in series for label in labels))
            family = CounterMetricFamily(f"codestop_{name}", f"{engine.name} engine: {name.replace('_', ' ')}", labels=names)
            for values, n in sorted(([labels.get(k, "") for k in names], n) for labels, n in series):
                family.add_metric(values, n)
            yield family


class Metrics:
    """The proxy's series: requests by endpoint and status, latency to the last byte, requests in
    flight, stops by reason, tokens by kind; the process's; the engine's counters."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(EngineCounters(engine))
        self.requests = Counter("codestop_requests", "Requests answered, by endpoint and HTTP status (499: the client left).",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("codestop_request_duration_seconds", "Request latency, to the last byte.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("codestop_requests_in_flight", "Requests being answered now.", registry=r)
        self.stops = Counter("codestop_stops", "Answers by stop reason.", ["reason"], registry=r)
        self.tokens = Counter("codestop_tokens", "Tokens by kind.", ["kind"], registry=r)
        self.steps = Counter("codestop_reasoning_steps", "Reasoning steps (boundary to boundary) scanned.", registry=r)

    def count_result(self, result: Result) -> None:
        self.stops.labels(result.stop_reason).inc()
        self.steps.inc(result.steps)
        for kind, n in result.tokens.items():
            self.tokens.labels(kind).inc(n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: counts each answer request once it is over, whatever ended it. The status
    is the response's, or ``state.outcome`` where the handler knows better (a stream that failed
    after its first byte, a client gone); in flight until then, even if a body never started."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        status = 500  # an exception that escapes is answered 500 outside this middleware

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(state.get("outcome", status))).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


class LimitBody:
    """ASGI middleware: a request body over ``max_bytes`` is a 413 before it is read whole: at
    once by its Content-Length, else (a chunked body) as soon as the bytes read pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def too_large(self, size: str) -> RequestError:
        return RequestError(f"body: the request body is {size} bytes; this server takes at most {self.max_bytes} "
                            "(--max-request-bytes)", "body", 413, "request_too_large")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            err = self.too_large(length.decode())
            payload = json.dumps(error_body(str(err), err.kind, err.param, err.code)).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
            return await send({"type": "http.response.body", "body": payload})
        read = 0

        async def counted() -> dict[str, Any]:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise self.too_large(f"more than {self.max_bytes}")  # answered 413 by the app's error handler
            return cast(dict[str, Any], message)

        await self.app(scope, counted, send)


# --------------------------------------------------------------------------------------------
# Requests: validation, prompt, policy, config
# --------------------------------------------------------------------------------------------


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


def build_policy(default: Mapping[str, Any], asked: Mapping[str, Any], prefix: str = "codestop.") -> Policy:
    """The asked method with its knobs; knobs given without a method adjust the default method,
    a different method starts from its own defaults."""
    default_method = default.get("method", "codestop")
    method = asked.get("method", default_method)
    if not isinstance(method, str):
        raise RequestError(f"{prefix}method: {method!r} must be a string", f"{prefix}method")
    knobs = {k: v for k, v in default.items() if k != "method"} if method == default_method else {}
    knobs.update((k, v) for k, v in asked.items() if k != "method")
    try:
        return make_policy(method, **knobs)
    except (ValueError, TypeError) as err:
        raise RequestError(f"{prefix}{err}", f"{prefix}{_param(str(err)) or 'method'}") from None


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return value is None or any(type(value) is type(v) and value == v for v in neutral)  # True is no 1


def check_fields(body: Mapping[str, Any], chat: bool) -> None:
    """Every field is honoured, harmless, or a 400 naming it: nothing is accepted and ignored."""
    prompt_field = "messages" if chat else "prompt"
    for key, value in body.items():
        if key in UNSUPPORTED_FIELDS:
            neutral, why = UNSUPPORTED_FIELDS[key]
            if not _neutral(value, neutral):
                raise RequestError(f"{key}: {value!r} is not supported by the codestop proxy ({why})", key,
                                   code="unsupported_parameter")
        elif key not in OPENAI_FIELDS and key not in HARMLESS_FIELDS and key != prompt_field:
            raise RequestError(f"{key}: unrecognized request argument (the codestop proxy honours "
                               f"{', '.join([prompt_field, *OPENAI_FIELDS])} and codestop)", key, code="unknown_parameter")


def parse_stop(value: Any) -> tuple[str, ...]:
    """OpenAI's ``stop``: a string or a list of at most four (non-empty) strings."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise RequestError(f"stop: {value!r} must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop: {len(stops)} stop strings given; at most {MAX_STOPS} are allowed", "stop")
    return tuple(stops)


def request_config(body: Mapping[str, Any], default: GenerationConfig, options: Mapping[str, Any], stream: bool,
                   answer: str = DEFAULT_ANSWER) -> GenerationConfig:
    """The default config with the endpoint's ``answer`` mode, the request's OpenAI fields, then its
    ``codestop`` generation fields, applied; a streamed answer shows its text live."""
    config = default.replace(live_text=stream, answer=answer)
    for key, name in OPENAI_FIELDS.items():
        if body.get(key) is not None:
            value = parse_stop(body[key]) if key == "stop" else body[key]
            try:
                config = config.with_options({name: value})
            except ValueError as err:
                raise RequestError(key + str(err).removeprefix(name), key) from None
    try:
        return config.with_options(options, prefix="codestop.")
    except ValueError as err:
        raise RequestError(str(err), _param(str(err))) from None


def split_options(options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A request's ``codestop`` field as (policy knobs, generation fields)."""
    if options is None:
        return {}, {}
    if not isinstance(options, dict):
        raise RequestError('codestop: must be an object, e.g. {"method": "codestop", "tau": 7}', "codestop")
    unknown = sorted(set(options) - POLICY_FIELDS - GENERATION_FIELDS)
    if unknown:
        known = ", ".join(sorted(POLICY_FIELDS | GENERATION_FIELDS))
        raise RequestError(f"codestop.{unknown[0]}: unknown option; known options: {known}", f"codestop.{unknown[0]}")
    return ({k: v for k, v in options.items() if k in POLICY_FIELDS},
            {k: v for k, v in options.items() if k in GENERATION_FIELDS})


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{i}]: only text parts are supported", f"{where}[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise RequestError(f"{where}: must be a string or a list of text parts", where)


def parse_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}]: must be an object with a role and a content", f"messages[{i}]")
        if m["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role: {m['role']!r} is not a role the codestop proxy renders; "
                               f"use one of {', '.join(ROLES)}", f"messages[{i}].role")
        out.append({"role": m["role"], "content": _text_content(m.get("content"), f"messages[{i}].content")})
    return out


def parse_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt: must be a non-empty string (one prompt per request)", "prompt")
    return prompt


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream: must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options: must be an object", "stream_options")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage: must be true or false", "stream_options.include_usage")
    return stream, include_usage


def served_models(engine: Engine, served_model_name: Sequence[str] = ()) -> list[str]:
    """The model names the proxy answers to: ``served_model_name`` where given (``--served-model-name``,
    as vLLM's), else the engine's one model, under the upstream's own name for a server engine (an
    upstream serving several is used for that one only: a request for another would otherwise be
    answered by the wrong model)."""
    if served_model_name:
        return list(served_model_name)
    return [engine.model_name] if engine.model_name else []


def check_model(body: Mapping[str, Any], engine: Engine, served_model_name: Sequence[str] = ()) -> str:
    """The model name to answer with: the one asked for, which the proxy must serve (404
    otherwise, as OpenAI's), or when none is asked for the first served name (the engine's own
    without ``served_model_name``)."""
    model = body.get("model")
    if model is None:
        return served_model_name[0] if served_model_name else engine.model_name
    if not isinstance(model, str):
        raise RequestError(f"model: {model!r} must be a string", "model")
    names = served_models(engine, served_model_name)
    if model not in names:
        raise RequestError(f"model: the model {model!r} does not exist; this server serves {', '.join(names)}",
                           "model", 404, "model_not_found")
    return model


async def prepare(body: Any, engine: Engine, config: GenerationConfig, policy: Mapping[str, Any], chat: bool,
                  answer: str = DEFAULT_ANSWER, served_model_name: Sequence[str] = ()) -> Prepared:
    """Validate a request body (every mistake raises a RequestError naming its field) and render
    its prompt: the client's conversation exactly as sent through the model's template (opened for
    thinking where the family thinks), or its raw prompt. ``answer``: a chat answer's mode after a
    stop unless the request's ``codestop.answer`` says (a raw completion's is "none").
    ``served_model_name``: the names the proxy serves the model under (default: the engine's)."""
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object", "body")
    check_fields(body, chat)
    model = check_model(body, engine, served_model_name)
    stream, include_usage = _stream_flags(body)
    knobs, generation = split_options(body.get("codestop"))
    chosen = build_policy(policy, knobs)
    config = request_config(body, config, generation, stream, answer if chat else "none")
    check_max_tokens(body, config, engine)
    family = get_family(config.family, engine, config.enable_thinking)
    if chat:
        messages = parse_messages(body)
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        prompt = await render_messages(engine, family, messages)
    else:
        question = prompt = parse_prompt(body)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return Prepared(chat, question, prompt, family, chosen, config, stream, include_usage, rid, model, int(time.time()))


def check_max_tokens(body: Mapping[str, Any], config: GenerationConfig, engine: Engine) -> None:
    """A ``max_tokens`` the model's context window cannot hold beside a prompt is a 400 (not
    silently lowered to what fits)."""
    window = engine.context_window
    if config.max_tokens is None or window is None or config.max_tokens < window:
        return
    key = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), "max_tokens")
    raise RequestError(f"{key}: {config.max_tokens} is more than the model's context window ({window} tokens, "
                       f"prompt included) can hold; ask for fewer than {window}", key)


async def render_messages(engine: Engine, family: Family, messages: list[dict[str, str]]) -> str:
    """The conversation through the model's chat template; one the template refuses (a role or an
    order it does not render) is a 400 naming ``messages``."""
    try:
        return cast(str, await engine.run_tokenizer(family.render, engine, messages))
    except _template_errors() as err:
        raise RequestError(f"messages: the model's chat template cannot render them ({err})", "messages") from None


def _template_errors() -> tuple[type[Exception], ...]:
    try:
        from jinja2 import TemplateError
    except ImportError:  # no Jinja here: no template to refuse a conversation
        return ()
    return (TemplateError,)


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iteratively: no recursion limit to hit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))
    return deepest


async def read_json(request: Any) -> Any:
    too_deep = RequestError(f"body: nested more than {MAX_JSON_DEPTH} levels deep", "body")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise RequestError("body: not valid JSON", "body") from None
    except RecursionError:  # nested deeper than the parser goes
        raise too_deep from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    return body


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
    completion, everything is ``content``, as the model wrote it."""

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
    included, under ``codestop``."""
    t = result.tokens
    completion = t["reasoning"] + t["answer"]
    return {
        "prompt_tokens": t["prompt"],
        "completion_tokens": completion,
        "total_tokens": t["prompt"] + completion,
        "completion_tokens_details": {"reasoning_tokens": t["reasoning"] if family.thinks else 0},
        "codestop": {
            "method": result.method,
            "stop_reason": result.stop_reason,
            "stopped_early": result.stop_reason not in ("finished", "budget", "max_reasoning_tokens"),
            "stop_position": result.stop_position,
            "reasoning_tokens": t["reasoning"],
            "answer_tokens": t["answer"],
            "probe_tokens": t["probe"],
            "probe_prompt_tokens": t["probe_prompt"],
            "overrun_tokens": t.get("overrun", 0),
            "probes": len(result.probes),
            "steps": result.steps,
            "answer": result.answer,
            # known only when nothing was cut: the model finished on its own
            "tokens_saved": 0 if result.stop_reason == "finished" else None,
            "cost": result.cost,
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


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk(prep: Prepared, delta: dict[str, str] | None, finish: str | None = None) -> dict[str, Any]:
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
                     metrics: Metrics, state: Any) -> AsyncGenerator[str, None]:
    """The SSE chunks of one streamed answer: ``head`` (already pulled), then the rest of
    ``stream``; the usage, when asked for (``stream_options.include_usage``), in a last chunk of
    its own. A failure after the first byte ends the stream with an error event."""
    splitter = Splitter(prep.family, prep.chat)
    async with aclosing(stream):
        if prep.chat:
            yield _sse(_chunk(prep, {"role": "assistant", "content": ""}))
        try:
            async for item in _chain(head, stream):
                if isinstance(item, Result):
                    for where, piece in splitter.flush():
                        yield _sse(_chunk(prep, {where: piece}))
                    tail = _sse(_chunk(prep, {}, finish_reason_of(item, prep.config)))
                    if prep.include_usage:
                        tail += _sse({**_chunk(prep, None), "usage": usage_of(item, prep.family)})
                    metrics.count_result(item)
                    yield tail + "data: [DONE]\n\n"
                    state.outcome = 200
                elif item.kind in ("reasoning", "answer"):
                    for where, piece in splitter.feed(item.kind, item.text):
                        yield _sse(_chunk(prep, {where: piece}))
        except Exception as exc:  # the status line is sent: the error goes in the stream
            state.outcome, payload = error_for(exc, "messages" if prep.chat else "prompt")
            if state.outcome == 500:
                log.exception("answer failed mid-stream")
            yield _sse(payload)


async def _chain(head: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in head:
        yield item
    async for item in rest:
        yield item


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


async def unless_disconnected(request: Any, work: Awaitable[T]) -> T:
    """``work``'s value while the client stays; a client that leaves cancels it (which closes its
    stream and so frees its session) and raises ClientGone."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# The app (FastAPI and Starlette are imported here only: the CLI runs without the serve extra)
# --------------------------------------------------------------------------------------------


def create_app(
    engine: Engine | Callable[[], Engine],
    *,
    config: GenerationConfig = DEFAULT_CONFIG,
    policy: Mapping[str, Any] = DEFAULT_POLICY,
    answer: str = DEFAULT_ANSWER,
    proxy_api_key: str | None = None,
    close_engine: bool = True,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    served_model_name: str | Sequence[str] | None = None,
) -> Any:
    """The FastAPI app answering OpenAI-style requests with ``engine``, or with the engine a
    blocking ``engine()`` builds at startup in a worker thread (a model loading: ``/health`` and
    requests are 503 until it is there). ``config`` and ``policy`` (a method and its knobs, as in a
    request's ``codestop`` field) are the server-wide defaults; ``answer`` is a chat answer's mode
    after a stop (``config.answer`` is not read: a raw completion's mode is "none"), a request's
    ``codestop.answer`` overrides both. The app closes the engine at shutdown unless
    ``close_engine`` is False (a shared engine). A request body over ``max_request_bytes`` is a
    413. With ``proxy_api_key`` set, only ``/health``'s bare status is public: its details,
    ``/metrics`` and ``/v1`` ask for the key, and the API docs are off. ``served_model_name`` (one
    name or several, as vLLM's ``--served-model-name``) is what ``/v1/models`` lists and requests
    may name, responses carrying the one asked for (the first when none is); default: the
    engine's model name (a server engine's upstream's)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    build_policy(policy, {}, prefix="")  # a bad server-wide default fails at start, not per request
    if answer not in ANSWER_MODES:
        raise CodestopError(f"answer: {answer!r} must be one of {', '.join(ANSWER_MODES)}")
    if not (isinstance(max_request_bytes, int) and not isinstance(max_request_bytes, bool) and max_request_bytes >= 1):
        raise CodestopError(f"max_request_bytes: {max_request_bytes!r} must be an integer >= 1")
    names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name or ())
    if (served_model_name is not None and not names) or not all(isinstance(n, str) and n for n in names):
        raise CodestopError(f"served_model_name: {served_model_name!r} must be one or more non-empty names")
    make = None if isinstance(engine, Engine) else engine
    served = Served(engine if isinstance(engine, Engine) else None, config, dict(policy), answer, proxy_api_key,
                    tuple(dict.fromkeys(names)))

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        building = None if make is None else asyncio.create_task(served.build(make))
        try:
            yield
        finally:
            if building is not None:
                await asyncio.gather(building, return_exceptions=True)  # a thread cannot be cancelled
            if close_engine and served.engine is not None:
                await served.engine.aclose()

    keyed = bool(proxy_api_key)  # the API docs would be public: off then
    app = FastAPI(title="codestop", version=_version(), lifespan=lifespan, docs_url=None if keyed else "/docs",
                  redoc_url=None if keyed else "/redoc", openapi_url=None if keyed else "/openapi.json")
    app.state.served = served
    app.add_middleware(LimitBody, max_bytes=max_request_bytes)  # inside CountRequests: a 413 is counted
    app.add_middleware(CountRequests, metrics=served.metrics)
    for kind in (RequestError, CodestopError, HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, on_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    for router in _routes(served):
        app.include_router(router)
    return app


@dataclass
class Served:
    """What the handlers answer with. ``engine`` is None until it is built (``build``)."""

    engine: Engine | None
    config: GenerationConfig
    policy: dict[str, Any]
    answer: str
    proxy_api_key: str | None
    served_model_name: tuple[str, ...] = ()  # the names the model is served under (none: the engine's)
    metrics: Metrics = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None  # why building the engine failed

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine)

    async def build(self, make: Callable[[], Engine]) -> None:
        try:
            self.engine = await asyncio.to_thread(make)
        except Exception as err:
            self.load_error = redact(str(err) or type(err).__name__)
            log.error("the engine failed to start: %s", self.load_error, exc_info=not isinstance(err, CodestopError))

    async def ready_engine(self) -> Engine:
        """The engine once it can answer: a 503 saying why while it is being built, or while its
        upstream is not up yet (a server engine started before it connects on first use)."""
        if self.engine is None:
            if self.load_error is not None:
                raise RequestError(f"the engine failed to start: {self.load_error}", None, 503, "engine_failed", "server_error")
            raise RequestError("the model is still loading; retry shortly", None, 503, "model_loading", "server_error")
        await self.engine.ready()  # a server engine connects now if not yet (a 503 ServerError)
        return self.engine


def _routes(s: Served) -> tuple[Any, Any]:
    """The open route (/health) and the others (/metrics, /v1), behind the key check when a key is
    set. /health's details (engine, model, upstream URL) are for the key's holders then; the
    upstream's error text is never public."""
    from fastapi import APIRouter, Depends, Request
    from fastapi.responses import JSONResponse, Response

    def has_key(request: Request) -> bool:
        """The request carries the proxy's key (the scheme in any case, RFC 7235; the key compared
        in constant time)."""
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        right = hmac.compare_digest(token.strip().encode(), (s.proxy_api_key or "").encode())
        return right and scheme.lower() == "bearer"

    async def require_key(request: Request) -> None:
        if s.proxy_api_key and not has_key(request):
            raise RequestError("invalid or missing API key (Authorization: Bearer ...)", None, 401,
                               "invalid_api_key", "authentication_error")

    opened, v1 = APIRouter(), APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @opened.get("/health")
    async def health(request: Request) -> JSONResponse:
        holder = bool(s.proxy_api_key) and has_key(request)  # may read details and the upstream's errors
        if s.engine is None:
            status = "failed" if s.load_error is not None else "loading"
            return JSONResponse({"status": status, **({"error": s.load_error} if s.load_error and holder else {})}, status_code=503)
        state = await s.engine.health()
        ok = bool(state.get("ok"))
        body = {"status": "ok" if ok else "degraded"}
        if holder or not s.proxy_api_key:
            body.update({"engine": s.engine.name, "model": s.engine.model_name, **{k: v for k, v in state.items() if k != "ok"}})
            if "base_url" in body:
                body["base_url"] = redact(str(body["base_url"]))
        return JSONResponse(body if holder else without_errors(body), status_code=200 if ok else 503)

    @opened.get("/metrics", dependencies=[Depends(require_key)])
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> JSONResponse:
        engine = await s.ready_engine()
        cards = [{"id": name, "object": "model", "created": s.created, "owned_by": "codestop"} for name in served_models(engine, s.served_model_name)]
        return JSONResponse({"object": "list", "data": cards})

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(s, request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await answer(s, request, chat=False)

    return opened, v1


def without_errors(value: Any) -> Any:
    """A health state without the upstream's error texts (``error``, a replica's ``last_error``)."""
    if isinstance(value, dict):
        return {k: without_errors(v) for k, v in value.items() if k not in ("error", "last_error")}
    if isinstance(value, list):
        return [without_errors(v) for v in value]
    return value


async def answer(s: Served, request: Any, chat: bool) -> Any:
    """One answer: consumed to its Result, or streamed as SSE from its first text on."""
    from fastapi.responses import JSONResponse

    body = await read_json(request)
    engine = await s.ready_engine()
    prep = await prepare(body, engine, s.config, s.policy, chat, s.answer, s.served_model_name)
    run = (engine, prep.question, prep.policy, prep.config)
    raw = not prep.chat  # a raw completion's text is all visible, a thinking family's reasoning too: its stops end it
    if not prep.stream:
        result = await unless_disconnected(request, agenerate(*run, family=prep.family, prompt=prep.prompt,
                                                              stop_in_reasoning=raw))
        s.metrics.count_result(result)
        return JSONResponse(full_response(result, prep))
    stream = cast(AsyncGenerator[Event | Result, None],
                  astream(*run, family=prep.family, prompt=prep.prompt, stop_in_reasoning=raw))
    head = await unless_disconnected(request, pull_head(stream))
    request.state.outcome = 499  # until the body is sent to its end
    return event_stream(sse_events(prep, head, stream, s.metrics, request.state), stream)


async def on_error(request: Any, exc: Exception) -> Any:
    from fastapi.responses import JSONResponse

    prompt_param = "prompt" if request.url.path == "/v1/completions" else "messages"
    status, body = error_for(exc, prompt_param, f"{request.method} {request.url.path}")
    if status == 500:
        log.error("answer failed", exc_info=exc)
    return JSONResponse(body, status_code=status, headers={"connection": "close"} if status == 413 else None)


async def on_client_gone(request: Any, exc: Exception) -> Any:
    from fastapi.responses import Response

    return Response(status_code=499)


def event_stream(body: AsyncGenerator[str, None], stream: AsyncGenerator[Any, None]) -> Any:
    """An SSE response whose generation is closed however the response ends: finished, failed, the
    client gone, or its body never started (a generator that never ran has no ``finally`` to run)."""
    return _event_stream_type()(body, stream)


@functools.cache
def _event_stream_type() -> type:
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        def __init__(self, body: AsyncGenerator[str, None], stream: AsyncGenerator[Any, None]) -> None:
            super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.events, self.stream = body, stream

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            # Starlette's streaming, but a client gone cancels the body once, the asyncio way:
            # under an anyio cancel scope every await of the stream's cleanup would be cancelled
            # again, and the session's close with it.
            body = asyncio.ensure_future(self.stream_response(send))
            gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
            try:
                await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (body, gone):
                    task.cancel()
                await asyncio.gather(body, gone, return_exceptions=True)
                await self.events.aclose()
                await self.stream.aclose()
            if not body.cancelled() and body.exception() is not None:
                raise body.exception()  # type: ignore[misc]

    return EventStream


def _version() -> str:
    from codestop import __version__

    return __version__
