"""``codestop serve``: an OpenAI-compatible HTTP server that applies a stopping policy to every
request, in front of a completions server (vLLM, SGLang, llama.cpp) or an in-process engine.

Clients talk to it as to any OpenAI endpoint (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``; streaming or not). The reasoning comes back in ``reasoning_content`` (as vLLM's
reasoning parsers put it) and the answer in ``content``; the policy is chosen per request with an
extra body field, ``{"codestop": {"method": "codestop", "tau": 7}}``, over the server-wide default;
``usage`` carries codestop's own figures under ``usage.codestop``. ``/health`` and ``/metrics``
(Prometheus text) are open; everything under ``/v1`` asks for ``proxy_api_key`` when one is set.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at runtime
import argparse
import asyncio
import hmac
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from typing import Any

from codestop.engines.base import CodestopError, ContextTooLong, Engine
from codestop.families import Family, get_family
from codestop.policies import METHOD_OPTIONS, make_policy

POLICY_KEYS = ("method", *sorted({k for opts in METHOD_OPTIONS.values() for k in opts}))
GENERATION_KEYS = ("probe_interval", "boundaries", "max_new_tokens")
REQUEST_OPTION_KEYS = (*POLICY_KEYS, *GENERATION_KEYS)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)


class RequestError(Exception):
    """A client's mistake: HTTP ``status`` with an OpenAI-style error naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-style body for an exception raised while answering."""
    from codestop.engines.server import ServerError

    if isinstance(exc, RequestError):
        return exc.status, error_body(str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, ContextTooLong):
        return 400, error_body(str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, ServerError):
        return exc.status, error_body(str(exc), "upstream_error", None, "upstream_unavailable")
    if isinstance(exc, (CodestopError, ValueError)):
        return 400, error_body(str(exc), "invalid_request_error")
    return 500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")


# --------------------------------------------------------------------------------------------
# Metrics (Prometheus text format; a handful of series, no dependency)
# --------------------------------------------------------------------------------------------


@dataclass
class Metrics:
    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, status) -> n
    stops: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    latency_buckets: dict[str, list[int]] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)
    in_flight: int = 0

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        buckets = self.latency_buckets.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds

    def count_result(self, stop_reason: str, tokens: dict[str, int]) -> None:
        self.stops[stop_reason] = self.stops.get(stop_reason, 0) + 1
        for kind, n in tokens.items():
            self.tokens[kind] = self.tokens.get(kind, 0) + n

    def render(self, engine: Engine) -> str:
        lines = [
            "# HELP codestop_requests_total Requests answered, by endpoint and HTTP status.",
            "# TYPE codestop_requests_total counter",
        ]
        lines += [f'codestop_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP codestop_stops_total Answers by stop reason.", "# TYPE codestop_stops_total counter"]
        lines += [f'codestop_stops_total{{reason="{r}"}} {n}' for r, n in sorted(self.stops.items())]
        lines += ["# HELP codestop_tokens_total Tokens by kind.", "# TYPE codestop_tokens_total counter"]
        lines += [f'codestop_tokens_total{{kind="{k}"}} {n}' for k, n in sorted(self.tokens.items())]
        lines += [
            "# HELP codestop_request_duration_seconds Request latency (whole answer).",
            "# TYPE codestop_request_duration_seconds histogram",
        ]
        for endpoint, buckets in sorted(self.latency_buckets.items()):
            for bound, n in zip(LATENCY_BUCKETS, buckets):
                le = "+Inf" if math.isinf(bound) else f"{bound:g}"
                lines.append(f'codestop_request_duration_seconds_bucket{{endpoint="{endpoint}",le="{le}"}} {n}')
            lines.append(f'codestop_request_duration_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]:.6f}')
            lines.append(f'codestop_request_duration_seconds_count{{endpoint="{endpoint}"}} {buckets[-1]}')
        lines += ["# HELP codestop_requests_in_flight Requests being answered now.", "# TYPE codestop_requests_in_flight gauge"]
        lines.append(f"codestop_requests_in_flight {self.in_flight}")
        stats = getattr(engine, "stats", None)
        if stats is not None:
            lines += [
                "# HELP codestop_upstream_requests_total Requests sent to the completions server, by kind.",
                "# TYPE codestop_upstream_requests_total counter",
            ]
            lines += [f'codestop_upstream_requests_total{{kind="{k}"}} {n}' for k, n in sorted(stats.by_kind.items())]
            lines += ["# TYPE codestop_upstream_retries_total counter", f"codestop_upstream_retries_total {stats.retries}"]
        lines += [
            "# HELP process_cpu_seconds_total CPU time of the proxy process (user + system).",
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {time.process_time():.6f}",
        ]
        rss = _resident_bytes()
        if rss is not None:
            lines += ["# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"]
        return "\n".join(lines) + "\n"


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# Requests: validation, prompt, policy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversationFamily(Family):
    """A family whose prompt is the client's own conversation (or raw prompt), not a question."""

    conversation: tuple[tuple[str, str], ...] = ()
    raw_prompt: str | None = None

    def messages(self, question: str) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.conversation]

    def build_prompt(self, engine: Engine, question: str) -> str:
        if self.raw_prompt is not None:
            return self.raw_prompt
        return super().build_prompt(engine, question)


def _family_for(base: Family, conversation: tuple[tuple[str, str], ...] = (), raw_prompt: str | None = None) -> ConversationFamily:
    values = {f.name: getattr(base, f.name) for f in fields(Family)}
    return ConversationFamily(**values, conversation=conversation, raw_prompt=raw_prompt)


def _number(body: dict[str, Any], key: str, *, integer: bool = False, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        kind = "an integer" if integer else "a number"
        bounds = "" if low is None else f" >= {low:g}" if high is None else f" in [{low:g}, {high:g}]"
        raise RequestError(f"{key}: {value!r} must be {kind}{bounds}", key)
    return int(value) if integer else float(value)


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


@dataclass
class ServeSettings:
    """The server-wide defaults a request can override through its ``codestop`` field."""

    policy: dict[str, Any] = field(default_factory=lambda: {"method": "codestop"})
    family: str | None = None
    enable_thinking: bool | None = None
    max_new_tokens: int = 32768
    probe_interval: int = 32
    boundaries: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


def request_policy(settings: ServeSettings, options: Any) -> tuple[Any, dict[str, Any]]:
    """The policy and generation overrides for one request's ``codestop`` field."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise RequestError("codestop: must be an object, e.g. {\"method\": \"codestop\", \"tau\": 7}", "codestop")
    unknown = sorted(set(options) - set(REQUEST_OPTION_KEYS))
    if unknown:
        raise RequestError(
            f"codestop.{unknown[0]}: unknown option; known options: {', '.join(REQUEST_OPTION_KEYS)}", f"codestop.{unknown[0]}"
        )
    asked = {k: v for k, v in options.items() if k in POLICY_KEYS}
    method = asked.get("method", settings.policy.get("method", "codestop"))
    if not isinstance(method, str):
        raise RequestError(f"codestop.method: {method!r} must be a string", "codestop.method")
    knobs = dict(settings.policy) if method == settings.policy.get("method") else {}
    knobs.update(asked)
    knobs.pop("method", None)
    try:
        policy = make_policy(method, **knobs)
    except (ValueError, TypeError) as err:
        name = str(err).split(":", 1)[0] if ":" in str(err) else "method"
        raise RequestError(f"codestop.{err}", f"codestop.{name}") from None
    generation: dict[str, Any] = {}
    for key in ("probe_interval", "max_new_tokens"):
        if key in options:
            generation[key] = _number(options, key, integer=True, low=0 if key == "probe_interval" else 1)
    if "boundaries" in options:
        b = options["boundaries"]
        if not isinstance(b, list) or not b or not all(isinstance(x, str) and x for x in b):
            raise RequestError("codestop.boundaries: must be a non-empty list of strings, e.g. [\"\\n\\n\", \"Wait\"]", "codestop.boundaries")
        generation["boundaries"] = b
    return policy, generation


@dataclass
class Prepared:
    question: str
    family: ConversationFamily
    policy: Any
    options: dict[str, Any]
    stream: bool
    include_usage: bool


def prepare(body: Any, settings: ServeSettings, engine: Engine, chat: bool) -> Prepared:
    """Validate a request body; every mistake raises a RequestError naming its field."""
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object", "body")
    base = get_family(settings.family, engine, settings.enable_thinking)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: must be a non-empty list of {role, content}", "messages")
        conversation = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}]: must be an object with a role and a content", f"messages[{i}]")
            conversation.append((m["role"], _text_content(m.get("content"), f"messages[{i}].content")))
        question = next((c for r, c in reversed(conversation) if r == "user"), conversation[-1][1])
        family = _family_for(base, conversation=tuple(conversation))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt: must be a non-empty string (one prompt per request)", "prompt")
        question = prompt
        family = _family_for(base, raw_prompt=prompt)
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError("n: only n = 1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream: must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options: must be an object", "stream_options")
    policy, generation = request_policy(settings, body.get("codestop"))
    max_tokens = _number(body, "max_completion_tokens", integer=True, low=1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", integer=True, low=1)
    options: dict[str, Any] = {
        "max_new_tokens": generation.get("max_new_tokens", max_tokens or settings.max_new_tokens),
        "probe_interval": generation.get("probe_interval", settings.probe_interval),
        "boundaries": generation.get("boundaries", settings.boundaries),
        "temperature": _number(body, "temperature", low=0),
        "top_p": _number(body, "top_p", low=0, high=1),
        "top_k": _number(body, "top_k", integer=True, low=0),
        "seed": _number(body, "seed", integer=True),
    }
    for key in ("temperature", "top_p", "top_k", "seed"):
        if options[key] is None:
            options[key] = getattr(settings, key)
    if options["top_p"] == 0:
        raise RequestError("top_p: 0 must be in (0, 1]", "top_p")
    return Prepared(question, family, policy, options, stream, bool(stream_options.get("include_usage", True)))


# --------------------------------------------------------------------------------------------
# Splitting the output into reasoning_content and content
# --------------------------------------------------------------------------------------------


class Splitter:
    """Routes the controller's text events to ``reasoning_content`` or ``content``.

    For a thinking family the reasoning ends at its ``think_end`` marker (hidden, possibly split
    over events) and codestop's forced close (``close_thinking``) is hidden too. For a plain family,
    or a raw completion, everything is ``content``."""

    def __init__(self, family: Family, split: bool) -> None:
        self.split = split and family.thinks
        self.think_end = family.think_end
        self.close_thinking = family.close_thinking
        self.in_answer = not self.split
        self.held = ""
        self.first_answer = True

    def feed(self, kind: str, text: str) -> list[tuple[str, str]]:
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

    def flush(self) -> list[tuple[str, str]]:
        held, self.held = self.held, ""
        if not held:
            return []
        return [("content" if self.in_answer else "reasoning_content", held)]


def split_result(result: Any, family: Family, split: bool) -> dict[str, str]:
    splitter = Splitter(family, split)
    parts = {"reasoning_content": "", "content": ""}
    for kind, text in (("reasoning", result.reasoning_text), ("answer", result.answer_text)):
        for where, piece in splitter.feed(kind, text):
            parts[where] += piece
    for where, piece in splitter.flush():
        parts[where] += piece
    return parts


def usage_of(result: Any) -> dict[str, Any]:
    t = result.tokens
    completion = t["reasoning"] + t["answer"]
    return {
        "prompt_tokens": t["prompt"],
        "completion_tokens": completion,
        "total_tokens": t["prompt"] + completion,
        "completion_tokens_details": {"reasoning_tokens": t["reasoning"]},
        "codestop": {
            "method": result.method,
            "stop_reason": result.stop_reason,
            "stopped_early": result.stop_reason not in ("finished", "budget"),
            "stop_position": result.stop_position,
            "reasoning_tokens": t["reasoning"],
            "answer_tokens": t["answer"],
            "probe_tokens": t["probe"],
            "probe_prompt_tokens": t["probe_prompt"],
            "probes": len(result.probes),
            "answer": result.answer,
            # known only when nothing was cut: the model finished on its own
            "tokens_saved": 0 if result.stop_reason == "finished" else None,
            "cost": result.cost,
        },
    }


def finish_reason_of(result: Any) -> str:
    return "length" if result.stop_reason == "budget" and result.method.get("method") != "budget" else "stop"


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    *,
    settings: ServeSettings | None = None,
    proxy_api_key: str | None = None,
    on_shutdown: Callable[[], Any] | None = None,
) -> Any:
    """The FastAPI app answering OpenAI-style requests with ``engine`` under codestop policies."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from codestop.controller import Event, agenerate

    settings = settings or ServeSettings()
    request_policy(settings, None)  # a bad server-wide default fails at start, not per request
    metrics = Metrics()
    app = FastAPI(title="codestop", version=_version())
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = settings
    created = int(time.time())

    if on_shutdown is not None:
        app.router.add_event_handler("shutdown", on_shutdown)

    def check_key(request: Request) -> JSONResponse | None:
        if not proxy_api_key:
            return None
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {proxy_api_key}".encode()):
            return JSONResponse(
                error_body("invalid or missing API key (Authorization: Bearer ...)", "authentication_error", None, "invalid_api_key"),
                status_code=401,
            )
        return None

    @app.get("/health")
    async def health() -> JSONResponse:
        check = getattr(engine, "base_url", None)
        if check is None:
            return JSONResponse({"status": "ok", "engine": engine.name, "model": engine.model_name})
        try:
            state = engine._state()  # type: ignore[attr-defined]
            r = await state.client.get(check + "/v1/models", timeout=5.0)
            ok = r.status_code == 200
        except Exception:  # noqa: BLE001 - any failure means the upstream is not usable
            ok = False
        body = {"status": "ok" if ok else "degraded", "engine": engine.name, "model": engine.model_name,
                "upstream": "ok" if ok else "unreachable"}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        denied = check_key(request)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "codestop"}]})

    async def answer(request: Request, chat: bool) -> Any:
        endpoint = "chat" if chat else "completions"
        t0 = time.perf_counter()
        denied = check_key(request)
        if denied is not None:
            metrics.count_request(endpoint, 401, time.perf_counter() - t0)
            return denied
        try:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise RequestError("body: not valid JSON", "body") from None
            prep = prepare(body, settings, engine, chat)
        except RequestError as err:
            status, payload = error_for(err)
            metrics.count_request(endpoint, status, time.perf_counter() - t0)
            return JSONResponse(payload, status_code=status)

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        model = engine.model_name
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_event(event: Event) -> None:
            if event.kind in ("reasoning", "answer") and event.text:
                queue.put_nowait((event.kind, event.text))

        async def run() -> Any:
            from codestop.engines.base import Boundaries, Sampling

            opts = prep.options
            if prep.stream:
                from codestop.engines.server import LIVE_TEXT

                LIVE_TEXT.set(True)  # this task's context only: stream each step token by token
            if _remote_tokenizer(engine):
                # templating and tokenizing are HTTP calls to the upstream here: make them in a worker
                # thread (they are cached), so the event loop never waits on them
                await asyncio.to_thread(lambda: engine.tokenize(prep.family.build_prompt(engine, prep.question)))
            return await agenerate(
                engine,
                prep.question,
                prep.policy,
                prep.family,
                max_new_tokens=opts["max_new_tokens"],
                probe_interval=opts["probe_interval"],
                # a policy that never probes needs no steps: one upstream request instead of one per step
                boundaries=(Boundaries.parse(opts["boundaries"]) if opts["boundaries"] else Boundaries())
                if prep.policy.needs_probes
                else Boundaries((), ()),
                sampling=Sampling(temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"], seed=opts["seed"]),
                on_event=on_event if prep.stream else None,
            )

        metrics.in_flight += 1
        task = asyncio.create_task(run())
        done_counted = False

        def finish(status: int, result: Any = None) -> None:
            nonlocal done_counted
            if done_counted:
                return
            done_counted = True
            metrics.in_flight -= 1
            metrics.count_request(endpoint, status, time.perf_counter() - t0)
            if result is not None:
                metrics.count_result(result.stop_reason, result.tokens)

        if not prep.stream:
            try:
                result = await task
            except BaseException as exc:  # noqa: BLE001 - every failure becomes an HTTP error
                if isinstance(exc, asyncio.CancelledError):
                    finish(499)
                    raise
                status, payload = error_for(exc)
                finish(status)
                return JSONResponse(payload, status_code=status)
            finish(200, result)
            return JSONResponse(_full_response(result, prep, rid, model, chat, created_at=int(time.time())))

        # streaming: wait for the first text (or a failure) so errors before any output are HTTP errors
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception() is not None and queue.empty():
            getter.cancel()
            status, payload = error_for(task.exception())  # type: ignore[arg-type]
            finish(status)
            return JSONResponse(payload, status_code=status)

        async def sse() -> AsyncIterator[str]:
            splitter = Splitter(prep.family, chat)
            now = int(time.time())
            status = 200
            pending_get: asyncio.Future[Any] | None = getter
            try:
                if chat:
                    yield _sse(_chunk(rid, model, now, chat, {"role": "assistant", "content": ""}, None))
                while True:
                    if pending_get is None:
                        pending_get = asyncio.ensure_future(queue.get())
                    if not pending_get.done():
                        await asyncio.wait({task, pending_get}, return_when=asyncio.FIRST_COMPLETED)
                    if pending_get.done():
                        kind, text = pending_get.result()
                        pending_get = None
                        for where, piece in splitter.feed(kind, text):
                            yield _sse(_chunk(rid, model, now, chat, {where: piece}, None))
                        continue
                    # the task ended and no text is waiting
                    pending_get.cancel()
                    pending_get = None
                    while not queue.empty():
                        kind, text = queue.get_nowait()
                        for where, piece in splitter.feed(kind, text):
                            yield _sse(_chunk(rid, model, now, chat, {where: piece}, None))
                    break
                for where, piece in splitter.flush():
                    yield _sse(_chunk(rid, model, now, chat, {where: piece}, None))
                exc = task.exception()
                if exc is not None:
                    status, payload = error_for(exc)
                    yield _sse(payload)
                    return
                result = task.result()
                last = _chunk(rid, model, now, chat, {}, finish_reason_of(result))
                if prep.include_usage:
                    last["usage"] = usage_of(result)
                yield _sse(last)
                yield "data: [DONE]\n\n"
                finish(200, result)
            except asyncio.CancelledError:
                status = 499  # the client went away: stop the generation, free its session
                raise
            finally:
                if pending_get is not None:
                    pending_get.cancel()
                if not task.done():
                    task.cancel()
                    try:
                        await task
                    except BaseException:  # noqa: BLE001 - cancelled on purpose
                        pass
                finish(status)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    return app


def _remote_tokenizer(engine: Engine) -> bool:
    from codestop.engines.server import RemoteTokens

    return isinstance(getattr(engine, "tokens", None), RemoteTokens)


def _version() -> str:
    from codestop import __version__

    return __version__


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk(rid: str, model: str, created: int, chat: bool, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    if chat:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    text = delta.get("content", "") + delta.get("reasoning_content", "")
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def _full_response(result: Any, prep: Prepared, rid: str, model: str, chat: bool, created_at: int) -> dict[str, Any]:
    parts = split_result(result, prep.family, chat)
    finish = finish_reason_of(result)
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": parts["content"]}
        if prep.family.thinks:
            message["reasoning_content"] = parts["reasoning_content"]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": parts["reasoning_content"] + parts["content"], "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created_at, "model": model, "choices": [choice], "usage": usage_of(result)}


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def build_engine(
    *,
    base_url: str | None = None,
    model: str | None = None,
    engine: str | None = None,
    tokenizer: str | None = None,
    api_key: str | None = None,
    concurrency: int | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    **engine_options: Any,
) -> Engine:
    """An upstream completions server (``base_url``; ``model`` picks one of its models) or an
    in-process engine (``model`` alone)."""
    from codestop.models import load_engine

    if base_url:
        from codestop.engines.server import ServerEngine

        extra = {k: v for k, v in (("concurrency", concurrency), ("timeout", timeout), ("retries", retries)) if v is not None}
        return ServerEngine.connect(base_url, model=model, api_key=api_key, tokenizer=tokenizer, **extra)
    if not model:
        raise CodestopError("serve: give --base-url URL (an upstream completions server) or --model M (an in-process engine)")
    return load_engine(model, engine=engine, **{k: v for k, v in engine_options.items() if v is not None})


def serve(
    *,
    base_url: str | None = None,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    proxy_api_key: str | None = None,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    **engine_options: Any,
) -> None:
    """Run the proxy until interrupted (see :func:`create_app`)."""
    import uvicorn

    eng = build_engine(base_url=base_url, model=model, **engine_options)
    app = create_app(eng, settings=settings, proxy_api_key=proxy_api_key, on_shutdown=getattr(eng, "close", None))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def add_parser(sub: Any) -> None:
    from codestop.cli import add_generation_options, add_model_options, add_policy_options

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server that stops each request's reasoning early",
        description=(
            "Serve /v1/chat/completions and /v1/completions (streaming or not) under a stopping policy, "
            "in front of an upstream completions server (--base-url, e.g. vLLM with --enable-prefix-caching) "
            "or an in-process engine (--model). A request picks its own policy with "
            '{"codestop": {"method": "codestop", "tau": 7}}; the flags below set the default.'
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--proxy-api-key",
        default=os.environ.get("CODESTOP_PROXY_API_KEY"),
        help="a key clients must send (Authorization: Bearer KEY); default $CODESTOP_PROXY_API_KEY, else none",
    )
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight to the upstream (default 64)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one upstream request may take (default 600)")
    p.add_argument("--retries", type=int, default=None, help="retries on 429/5xx/connection resets (default 3)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    add_model_options(p)
    add_policy_options(p)
    add_generation_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from codestop.cli import POLICY_KNOBS, generation_options

    if not args.base_url and not args.model:
        raise CodestopError("serve: give --base-url URL (an upstream completions server) or --model M (an in-process engine)")
    if not 0 < args.port < 65536:
        raise CodestopError(f"port: {args.port} must be in 1..65535")
    policy = {"method": args.method, **{k: getattr(args, k) for k in POLICY_KNOBS if getattr(args, k, None) is not None}}
    gen = generation_options(args)
    settings = ServeSettings(
        policy=policy,
        family=gen["family"],
        enable_thinking=gen["enable_thinking"],
        max_new_tokens=gen["max_new_tokens"],
        probe_interval=gen["probe_interval"],
        boundaries=gen["boundaries"],
        temperature=gen["temperature"],
        top_p=gen["top_p"],
        top_k=gen["top_k"],
        seed=gen["seed"],
    )
    try:
        request_policy(settings, None)
    except RequestError as err:
        raise CodestopError(str(err).removeprefix("codestop.")) from None
    serve(
        base_url=args.base_url,
        model=args.model,
        host=args.host,
        port=args.port,
        proxy_api_key=args.proxy_api_key,
        settings=settings,
        log_level=args.log_level,
        engine=args.engine,
        tokenizer=args.tokenizer,
        api_key=args.api_key,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
    )
    return 0
