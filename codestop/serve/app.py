"""The proxy's FastAPI app (:func:`create_app`, under :class:`~codestop.serve.options.ServeOptions`):
the routes, the key check, the engine built at start-up, the ASGI middlewares (the body's size
limit, the request counter) and the two ways an answer goes out (consumed to its Result, or
streamed as SSE).

The routes are module-level functions on two routers (``opened``: /health, /metrics and the page
/codestop; ``v1``); each reads what it answers with from its app's state
(``request.app.state.served``: a :class:`Served`), so several apps in one process share the routes
and not their state. A client that leaves is noticed by awaiting ASGI's ``http.disconnect``
(:func:`disconnected`), never by polling.

Without ``proxy_api_key`` everything is open; with one, only ``/health``'s bare status is: its
details, ``/metrics``, ``/codestop`` (also as a browser's Basic login) and everything under
``/v1`` ask for the key, and the API docs are off. The upstream's error text never reaches
``/health`` unauthenticated. A request body over ``max_request_bytes`` is a 413 before it is read
whole; one nested deeper than ``MAX_JSON_DEPTH`` is a 400 and leaves the connection usable.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at runtime
import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from codestop.controller import Event, Result, astream
from codestop.engines.base import Engine
from codestop.engines.server.routing import ROUTE
from codestop.engines.server.stopping import Stoppable
from codestop.errors import CodestopError, ServerBusy, redact, redact_logs, register_secret
from codestop.serve import responses, upstream_chat
from codestop.serve.guard import Guard, segment_tag
from codestop.serve.metrics import CountRequests, Metrics
from codestop.serve.options import ServeOptions
from codestop.serve.page import LOGIN_HEADERS, PAGE_HEADERS, page_key_ok, render_page, snapshot_of
from codestop.serve.protocol import ChatRequest, RequestError, error_body, error_for, parse_request
from codestop.serve.serving import (
    chain,
    full_response,
    prepare,
    pull_head,
    result_of,
    served_models,
    sse_events,
)
from codestop.serve.shadow import SHADOW_POLICY, Shadow

T = TypeVar("T")
log = logging.getLogger("codestop.serve")

MAX_JSON_DEPTH = 64  # the deepest nesting of a request body (OpenAI's bodies nest a few levels)


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nobody reads the response (499)."""


def create_app(engine: Engine | Callable[[], Engine], options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app answering OpenAI-style requests with ``engine``, or with the engine a
    blocking ``engine()`` builds at startup in a worker thread (a model loading: ``/health`` and
    requests are 503 until it is there), under ``options`` (:class:`ServeOptions`: the default
    config and policy, the key, the body limit, the served names, shadow mode; default: all
    defaults)."""
    options = ServeOptions() if options is None else options
    make = None if isinstance(engine, Engine) else engine
    register_secret(options.proxy_api_key)  # the upstream's key is registered by its ServerOptions
    # what the proxy, its server and its HTTP client log (httpcore's debug lines show an upstream's headers)
    redact_logs(log.name, "uvicorn.error", "uvicorn.access", "httpx", *(f"httpcore.{m}" for m in ("connection", "http11", "http2", "proxy")))
    shadowing = None if options.shadow is None else Shadow(options.shadow, options.shadow_fraction, options.shadow_text)
    served = Served(engine if isinstance(engine, Engine) else None, options, shadowing)
    if options.guarded:
        served.guard = Guard(options, shadowing, served.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        building = None if make is None else asyncio.create_task(served.build(make))
        try:
            yield
        finally:
            if building is not None:
                await asyncio.gather(building, return_exceptions=True)  # a thread cannot be cancelled
            if served.guard is not None:  # its audits use the engine: stopped first
                await served.guard.aclose()
            if options.close_engine and served.engine is not None:
                await served.engine.aclose()

    keyed = bool(options.proxy_api_key)  # the API docs would be public: off then
    app = FastAPI(title="codestop", version=_version(), lifespan=lifespan, docs_url=None if keyed else "/docs",
                  redoc_url=None if keyed else "/redoc", openapi_url=None if keyed else "/openapi.json")
    app.state.served = served
    app.add_middleware(LimitBody, max_bytes=options.max_request_bytes)  # inside CountRequests: a 413 is counted
    app.add_middleware(CountRequests, metrics=served.metrics)
    # each kind a handler of its own: one registered only as an Exception would be answered, then
    # raised again (Starlette's server-error middleware)
    for kind in (CodestopError, ValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, on_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.include_router(opened)
    app.include_router(v1)
    return app


@dataclass
class Served:
    """What the handlers answer with (an app's ``state.served``). ``engine`` is None until it is
    built (``build``)."""

    engine: Engine | None
    options: ServeOptions
    shadow: Shadow | None = None
    guard: Guard | None = None  # audits, the watch, auto mode (codestop.serve.guard)
    metrics: Metrics = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None  # why building the engine failed

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine)

    def describe(self) -> dict[str, Any]:
        """The policy applied (with its guarantee, or uncalibrated) and the shadow mode, for /health."""
        policy = self.options.policy_file  # the default policy and the guarantee it was calibrated with, if any
        out: dict[str, Any] = {"policy": policy.describe(), "guarantee": policy.guarantee}
        if self.shadow is not None:
            out["shadow"] = {"file": str(self.shadow.path), "fraction": self.shadow.fraction, "text": self.shadow.text}
        if self.guard is not None:
            out["guard"] = self.guard.describe()
        return out

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


# --------------------------------------------------------------------------------------------
# The routes: /health is open; /metrics, /codestop and /v1 ask for the key when one is set. Each
# reads what it answers with from its app's state (``app.state.served``).
# --------------------------------------------------------------------------------------------

KEY_MISSING = "invalid or missing API key (Authorization: Bearer ...)"


def served_by(request: Request) -> Served:
    """What the request's app answers with."""
    return cast(Served, request.app.state.served)


def has_key(request: Request) -> bool:
    """The request carries the proxy's key (the scheme in any case, RFC 7235; the key compared in
    constant time)."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    right = hmac.compare_digest(token.strip().encode(), (served_by(request).options.proxy_api_key or "").encode())
    return right and scheme.lower() == "bearer"


async def require_key(request: Request) -> None:
    if served_by(request).options.proxy_api_key and not has_key(request):
        raise RequestError(KEY_MISSING, None, 401, "invalid_api_key", "authentication_error")


opened = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


@opened.get("/health")
async def health(request: Request) -> JSONResponse:
    """The engine's state. With a key set, its details (engine, model, upstream URL) are for the
    key's holders; the upstream's error text is never public."""
    s = served_by(request)
    holder = bool(s.options.proxy_api_key) and has_key(request)  # may read details and the upstream's errors
    if s.engine is None:
        status = "failed" if s.load_error is not None else "loading"
        return JSONResponse({"status": status, **({"error": s.load_error} if s.load_error and holder else {})}, status_code=503)
    state = await s.engine.health()
    ok = bool(state.get("ok"))
    body: dict[str, Any] = {"status": "ok" if ok else "degraded"}
    if holder or not s.options.proxy_api_key:
        body.update({"engine": s.engine.name, "model": s.engine.model_name, **{k: v for k, v in state.items() if k != "ok"}})
        body.update(s.describe())
        if callable(connections := getattr(s.engine, "connections", None)):  # a server engine's pool: a leak shows here
            body["upstream_connections"] = connections()
    body = redacted(body)  # the upstream's URL and error texts
    return JSONResponse(body if holder else without_errors(body), status_code=200 if ok else 503)


@opened.get("/metrics", dependencies=[Depends(require_key)])
async def prometheus(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(served_by(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@opened.get("/codestop")
async def status_page(request: Request) -> Response:
    """The page a person reads (codestop.serve.page). With a key set, it asks for it as every route
    does, or as a browser's Basic login's password (the 401 says so, and a browser asks)."""
    s = served_by(request)
    key = s.options.proxy_api_key
    if key and not (has_key(request) or page_key_ok(request.headers.get("authorization", ""), key)):
        return JSONResponse(error_body(KEY_MISSING, "authentication_error", None, "invalid_api_key"), 401, LOGIN_HEADERS)
    return HTMLResponse(render_page(snapshot_of(s)), headers=PAGE_HEADERS)
@opened.get("/codestop/state", dependencies=[Depends(require_key)])
async def guard_state(request: Request) -> JSONResponse:
    """Each segment's state, audits and watch: the snapshot the page /codestop draws."""
    return JSONResponse(snapshot_of(served_by(request)))


@v1.get("/models")
async def models(request: Request) -> JSONResponse:
    s = served_by(request)
    engine = await s.ready_engine()
    cards = [{"id": name, "object": "model", "created": s.created, "owned_by": "codestop"}
             for name in served_models(engine, s.options.defaults.served_model_name)]
    return JSONResponse({"object": "list", "data": cards})


@v1.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await answer(served_by(request), request, chat=True)


@v1.post("/completions")
async def completions(request: Request) -> Response:
    return await answer(served_by(request), request, chat=False)


@v1.post("/responses")
async def create_response(request: Request) -> Response:
    """OpenAI's Responses API: a chat request in its shape (codestop.serve.responses)."""
    return await answer(served_by(request), request, chat=True, responses_api=True)


def redacted(value: Any) -> Any:
    """``value`` (JSON-like) with every string :func:`~codestop.errors.redact`-ed."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def without_errors(value: Any) -> Any:
    """A health state without the upstream's error texts (``error``, a replica's ``last_error``)."""
    if isinstance(value, dict):
        return {k: without_errors(v) for k, v in value.items() if k not in ("error", "last_error")}
    if isinstance(value, list):
        return [without_errors(v) for v in value]
    return value


async def answer(s: Served, request: Request, chat: bool, responses_api: bool = False) -> Response:
    """One answer: consumed to its Result, or streamed as SSE from its first text on. A Responses
    request (``responses_api``) is answered as the chat request it asks for, in its own shape."""
    data = await read_json(request)
    asked, body = responses.parse(data) if responses_api else (None, parse_request(data, chat))
    engine = await s.ready_engine()
    prep = await (prepare(body, engine, s.options.defaults) if asked is None else responses.prepare(body, engine, s.options.defaults))
    # every upstream request of this one (and the tasks it starts: audits) carries its routing key
    ROUTE.set(s.options.routing.route(prep.rid, request.headers, body.user))

    def shaped(completion: dict[str, Any]) -> dict[str, Any]:
        return completion if asked is None else responses.from_chat(completion, asked, prep)

    writer = None if asked is None else responses.ResponsesWriter(prep, asked)
    if isinstance(body, ChatRequest) and body.agent:  # tools, a response format: the upstream's chat answers
        if not prep.stream:
            return JSONResponse(shaped(await unless_disconnected(request, upstream_chat.complete(engine, body, prep, s.metrics))))
        chunks = upstream_chat.stream(engine, body, prep, s.metrics, request.state, writer)
        opening = await unless_disconnected(request, upstream_chat.first(chunks))
        request.state.outcome = 499  # until the body is sent to its end
        return event_stream(chain([opening], chunks), chunks)
    plan = None if s.guard is None else s.guard.plan(prep, segment_tag(request.headers, body), s.options.defaults.policy)
    shadowed = (plan is not None and plan.shadow) or (s.shadow is not None and s.shadow.chosen())
    policy = plan.policy if plan is not None and plan.policy is not None else prep.policy
    run = (engine, prep.question, *((SHADOW_POLICY, Shadow.config(prep.config)) if shadowed else (policy, prep.config)))
    raw = not prep.chat  # a raw completion's text is all visible, a thinking family's reasoning too: its stops end it
    stream = cast(AsyncGenerator[Event | Result, None],
                  astream(*run, family=prep.family, prompt=prep.prompt, stop_in_reasoning=raw))
    if shadowed:
        recorder = s.shadow if s.guard is None else s.guard.recorder
        assert recorder is not None
        sink = None if s.guard is None or plan is None else s.guard.sink(plan.segment)
        stream = recorder.watch(stream, prep, policy, s.metrics, sink)
    audit = plan if s.guard is not None and plan is not None and plan.audited and not shadowed else None
    if not prep.stream:
        result = await unless_disconnected(request, result_of(stream))
        s.metrics.count_result(result)
        after = None if s.guard is None or audit is None else BackgroundTask(s.guard.audit, engine, prep, result, policy, audit)
        return JSONResponse(shaped(full_response(result, prep)), background=after)  # audited once the client has it
    if s.guard is not None and audit is not None:
        stream = s.guard.audit_after(stream, engine, prep, policy, audit)
    head = await unless_disconnected(request, pull_head(stream))
    request.state.outcome = 499  # until the body is sent to its end
    return event_stream(sse_events(prep, head, stream, s.metrics, request.state, writer), stream)


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iteratively: no recursion limit to hit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))
    return deepest


async def read_json(request: Request) -> Any:
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


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s value while the client stays; a client that leaves cancels it (which closes its
    stream and so frees its session) and raises ClientGone. Called once the body is read: what the
    client sends next is its disconnect."""
    running = Stoppable(work)  # stopped by a cancel scope: an upstream response it is closing stays closed cleanly
    task = running.task
    gone = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():  # an answer ready as the client left is still the answer
            return cast(T, task.result())
        raise ClientGone()
    finally:
        gone.cancel()
        if not task.done():
            await running.stopped()
        await asyncio.gather(gone, return_exceptions=True)


async def disconnected(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    """Returns when the client has gone: ASGI's ``http.disconnect`` message, awaited as vLLM's
    routes and Starlette's streaming responses await it. (Polling ``request.is_disconnected()``
    answers late, and reads the raw ``receive`` past any middleware that wraps it.)"""
    while (await receive())["type"] != "http.disconnect":
        pass


async def on_error(request: Any, exc: Exception) -> Any:
    prompt_param = {"/v1/completions": "prompt", "/v1/responses": "input"}.get(request.url.path, "messages")
    status, body = error_for(exc, prompt_param, f"{request.method} {request.url.path}")
    if status == 500:
        log.error("answer failed", exc_info=exc)
    headers = {"connection": "close"} if status == 413 else None
    if isinstance(exc, ServerBusy):  # turned away for now: when to come back
        headers = {"retry-after": str(exc.retry_after)}
    return JSONResponse(body, status_code=status, headers=headers)


async def on_client_gone(request: Any, exc: Exception) -> Any:
    return Response(status_code=499)


def event_stream(body: AsyncGenerator[str, None], stream: AsyncGenerator[Any, None]) -> StreamingResponse:
    """An SSE response whose generation is closed however the response ends: finished, failed, the
    client gone, or its body never started (a generator that never ran has no ``finally`` to run)."""
    return EventStream(body, stream)


class EventStream(StreamingResponse):
    def __init__(self, body: AsyncGenerator[str, None], stream: AsyncGenerator[Any, None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.events, self.stream = body, stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Starlette's streaming, but a client gone stops the body by a cancel scope of its own
        # (codestop.engines.server.stopping: an upstream response being closed then is closed
        # cleanly), and the stream's own cleanup runs after, in this task, uncancelled.
        running = Stoppable(self.stream_response(send))
        body = running.task
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            running.stop()
            await asyncio.gather(body, gone, return_exceptions=True)
            await self.events.aclose()
            await self.stream.aclose()
        if not body.cancelled() and body.exception() is not None:
            raise body.exception()  # type: ignore[misc]


def _version() -> str:
    from codestop.version import __version__

    return __version__
