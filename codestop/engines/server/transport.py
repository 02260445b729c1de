"""HTTP to one completions server, and reading what it answers.

Every request is async on one ``httpx.AsyncClient`` per event loop (asyncio objects belong to one
loop; the sync API runs each question in a fresh loop), under the concurrency limit, with retries:
429, 5xx and connection errors are sent again after a backoff (``retries`` times at most); a 429 or
503 that outlasts them is a :class:`~codestop.errors.ServerBusy` (429/503 with ``Retry-After``).

Silence (``timeout``) is the server's, not one request's: every wait for a request's next byte
(its answer's head, a plain answer, a streamed event) goes on while the server sends this
transport anything on any request, or answers a ping (``GET /v1/models`` on a client of its own,
sent once the server has been quiet for half the timeout). A request queued behind busy slots, in a
long prefill or generating a long plain answer therefore waits, and only a server silent for
``timeout`` is one :class:`~codestop.errors.ServerTimeout` (the proxy's 504), never retried. One
request's wait for a byte of its own, and for a place in the limit, is bounded by ``queue_timeout``
apart: past it a :class:`~codestop.errors.ServerBusy` (503, ``Retry-After``). Prompts go as token ids; a server that refuses them while token ids never worked
there (llama-cpp-python) gets the same request once as text, and only if that works are later
prompts sent as text.

The parsers read every dialect's answers: ``/v1/completions`` answers and stream events (vLLM,
SGLang, llama.cpp) and llama.cpp's native ``/completion``. Never echo or prompt logprobs, which make
vLLM skip its prefix cache.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx

try:  # every event of every stream is parsed here: orjson (the serve extra's) where installed
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - the library without the serve extra
    from json import loads as _loads  # type: ignore[assignment]

from codestop.engines.server.options import ServerOptions
from codestop.engines.server.routing import ROUTE
from codestop.engines.server.stopping import close_response
from codestop.engines.server.waiting import BUSY_RETRY_AFTER_S, PING, Heed, Limit
from codestop.errors import ContextTooLong, ServerBusy, ServerError, ServerTimeout, ServerUnreachable, UpstreamRejected, UpstreamUnauthorized, redact

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BUSY_STATUSES = frozenset({429, 503})  # the server's own "not now": relayed as such, with Retry-After
MALFORMED_STATUSES = frozenset({400, 413, 422})  # the server's "this request is wrong": the client's error
COMPLETIONS = "/v1/completions"


@dataclass
class Token:
    """One generated token as a server's logprobs report it: id (None when the server gives only
    text), natural-log probability, and its exact bytes where the server says them (llama.cpp)."""

    id: int | None
    logprob: float | None
    piece: bytes | None = None


@dataclass
class Chunk:
    """A piece of a completion: its token ids (None when the server reports only text), their
    logprobs (None without), its text, and on the last piece the finish reason and what matched
    (a stop string, or a stop token's id; None for EOS or when the server does not say)."""

    ids: list[int] | None
    logprobs: list[float | None] | None
    text: str = ""
    finish: str | None = None
    stop: str | int | None = None
    pieces: dict[int, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Parsing what servers return
# --------------------------------------------------------------------------------------------


def parse_logprobs(logprobs: Any) -> list[Token] | None:
    """The tokens of a completion choice's ``logprobs``, in either format servers use: the chat
    format (llama.cpp: ``{"content": [{"id", "token", "bytes", "logprob"}]}``) or the legacy
    completions format (vLLM, SGLang: ``{"tokens", "token_logprobs"}``; vLLM writes tokens as
    ``token_id:N`` when asked with ``return_tokens_as_token_ids``). None when there are none."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        out = []
        for entry in logprobs["content"]:
            raw = entry.get("bytes")
            out.append(Token(entry.get("id"), entry.get("logprob"), bytes(raw) if isinstance(raw, list) and raw else None))
        return out
    if isinstance(logprobs.get("tokens"), list):
        lps = logprobs.get("token_logprobs") or [None] * len(logprobs["tokens"])
        out = []
        for tok, lp in zip(logprobs["tokens"], lps):
            digits = tok[9:] if isinstance(tok, str) and tok.startswith("token_id:") else ""
            out.append(Token(int(digits) if digits.lstrip("-").isdigit() else None, lp))
        return out
    return None


def _token_id(token: Any) -> int | None:
    """vLLM's ``token_id:N`` (``return_tokens_as_token_ids``); None for a token given as text."""
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[9:])
        except ValueError:
            return None
    return None


def parse_choice(data: dict[str, Any]) -> Chunk:
    """A ``/v1/completions`` answer or stream event (vLLM, SGLang and llama.cpp dialects)."""
    choices = data.get("choices") or []
    if not choices:
        return Chunk([], None)  # e.g. a usage-only stream event
    choice = choices[0]
    logprobs = choice.get("logprobs")
    ids = choice.get("token_ids")  # SGLang's (and newer vLLM's) return_token_ids
    pieces: dict[int, bytes] = {}
    lps: list[float | None] | None = None
    if isinstance(logprobs, dict) and isinstance(tokens := logprobs.get("tokens"), list):
        # the legacy completions format (vLLM, SGLang), read without a Token per token: the hot path
        lps = logprobs.get("token_logprobs") or [None] * len(tokens)
        if len(lps) != len(tokens):
            lps = lps[: len(tokens)] + [None] * (len(tokens) - len(lps))
        if not isinstance(ids, list):
            listed = [_token_id(t) for t in tokens]
            ids = None if None in listed else listed
    else:
        parsed = parse_logprobs(logprobs)
        if not isinstance(ids, list):
            ids = [t.id for t in parsed] if parsed is not None and all(t.id is not None for t in parsed) else None
        if parsed is not None:
            lps = [t.logprob for t in parsed]
            pieces = {t.id: t.piece for t in parsed if t.id is not None and t.piece is not None}
    stop = choice.get("stop_reason")  # vLLM
    if stop is None:
        stop = choice.get("matched_stop")  # SGLang
    return Chunk(ids, lps, choice.get("text") or "", choice.get("finish_reason"), stop, pieces)


def merge(chunks: list[Chunk]) -> Chunk:
    """Stream events read together as one chunk: their tokens in order, the last one's finish."""
    if len(chunks) == 1:
        return chunks[0]
    ids: list[int] | None = []
    lps: list[float | None] | None = []
    pieces: dict[int, bytes] = {}
    finish, stop = None, None
    for c in chunks:
        tokenless = not c.ids and not c.text  # e.g. the finish event: nothing to read
        if ids is not None and not tokenless:
            ids = None if c.ids is None else ids + c.ids
        if lps is not None and not tokenless:
            if c.logprobs is not None:
                lps += c.logprobs
            else:  # tokens without logprobs: the merged chunk has none
                lps = None
        pieces.update(c.pieces)
        if c.finish:
            finish, stop = c.finish, c.stop
    return Chunk(ids, lps, "".join(c.text for c in chunks), finish, stop, pieces)


def parse_native(data: dict[str, Any]) -> Chunk:
    """llama.cpp's native ``/completion`` answer (asked with ``return_tokens`` and ``n_probs``): every
    generated id (a stop string's too, though ``content`` is trimmed), and how it stopped."""
    ids = [int(t) for t in data.get("tokens") or []]
    pieces = {}
    for entry in data.get("completion_probabilities") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), int) and isinstance(entry.get("bytes"), list) and entry["bytes"]:
            pieces[entry["id"]] = bytes(entry["bytes"])
    stop_type = data.get("stop_type")
    if stop_type is None:  # before llama.cpp had stop_type
        stop_type = next((k for k in ("eos", "word", "limit") if data.get(f"stopped_{k}")), None)
    finish = {"eos": "stop", "word": "stop", "limit": "length"}.get(str(stop_type))
    stop = data.get("stopping_word") if stop_type == "word" else None
    return Chunk(ids, None, str(data.get("content") or ""), finish, stop, pieces)


def error_message(response: httpx.Response) -> str:
    """The server's own error message (OpenAI-style ``{"error": {"message"}}`` or FastAPI's
    ``{"detail"}``), else the start of the body; anything that looks like a credential redacted
    (the message is relayed to codestop's clients and logs)."""
    return redact(_error_text(response))


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return json.dumps(body["detail"])[:300] if not isinstance(body["detail"], str) else body["detail"]
        if body.get("message"):
            return str(body["message"])
    return str(body)[:300]


def upstream_error(response: httpx.Response, where: str, attempts: int = 1) -> ServerError | ContextTooLong:
    """The one mapping of a server's error answer (after ``attempts`` tries) to the error the proxy
    answers with: its key refused (the operator's: a 502 that says so), a prompt over the window,
    busy after every retry (429/503 with ``Retry-After``), a request it calls malformed (the
    client's: a 400 in its words), anything else a 502."""
    status, message = response.status_code, error_message(response)
    if status in (401, 403):
        return UpstreamUnauthorized(f"the completions server at {where} refused the proxy's credentials ({status}: {message}); "
                                    "the operator must fix its key (--api-key, $CODESTOP_UPSTREAM_API_KEY)", status)
    if mentions_context(message):
        return ContextTooLong(f"the completions server says: {message}")
    if status in BUSY_STATUSES:
        after = response.headers.get("retry-after", "")
        return ServerBusy(f"the completions server is busy: it answered {status} {attempts} time{'s' * (attempts > 1)}: "
                          f"{message}; retry later", status, int(after) if after.isdigit() else BUSY_RETRY_AFTER_S, status)
    if status in MALFORMED_STATUSES:
        return UpstreamRejected(f"the completions server refused the request: it answered {status}: {message}", status)
    return ServerError(f"the completions server answered {status}: {message}", 502, status)


def timeout_error(where: str, timeout: httpx.Timeout, err: httpx.TimeoutException) -> ServerTimeout:
    """The one error for a server that stays silent: 504, whichever call noticed it."""
    if isinstance(err, httpx.ConnectTimeout):
        return ServerTimeout(f"the completions server at {where} did not accept a connection within {timeout.connect:g} s; "
                             "it may be overloaded or hung")
    return ServerTimeout(f"the completions server at {where} did not answer within {timeout.read:g} s "
                         f"({type(err).__name__}); it may be overloaded or hung")


def mentions_context(message: str) -> bool:
    low = message.lower()
    return "context" in low and ("exceed" in low or "length" in low or "too long" in low or "maximum" in low)


def parse_json(content: str | bytes, where: str) -> Any:
    try:
        return _loads(content)
    except ValueError:  # orjson's JSONDecodeError is one too
        pass
    try:  # what orjson refuses and Python writes: NaN, -Infinity (a logprob of -inf, through json.dumps)
        return json.loads(content)
    except ValueError:
        raise ServerError(f"the completions server at {where} answered with invalid JSON: {redact(repr(content[:200]))}") from None


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------



@dataclass
class LoopState:
    """What an event loop owns: its HTTP client, its concurrency limit, and the small client that
    pings a quiet server (its own, so a ping never waits for a place in the busy pool)."""

    client: httpx.AsyncClient
    limit: Limit
    pinger: httpx.AsyncClient
    ping: asyncio.Task[None] | None = None



@dataclass
class RequestStats:
    """What was sent (the engine's :meth:`~codestop.engines.server.ServerEngine.counters`)."""

    retries: int = 0
    text_fallbacks: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Transport:
    """The HTTP clients of one server and the requests sent on them. ``as_text`` turns a token-id
    prompt into text, for a server that takes text prompts only; ``sync``: the blocking client
    (connecting, the server's tokenizer and template), made here when not given."""

    def __init__(self, base_url: str, options: ServerOptions, as_text: Callable[[Sequence[int]], Awaitable[str]],
                 sync: httpx.Client | None = None) -> None:
        self.base_url = base_url
        self.options = options
        self.timeout = httpx.Timeout(options.timeout, connect=options.connect_timeout)
        # a generation request's own timeouts: its reads are watched by Heed, which ends them first;
        # httpx's read and pool timeouts only back it up
        backstop = None if options.queue_timeout is None else options.queue_timeout + options.timeout
        self.waiting = httpx.Timeout(options.timeout, connect=options.connect_timeout, read=backstop, pool=backstop)
        self.as_text = as_text
        self.text_prompts = False  # switched on when only text prompts work on this server
        self._ids_confirmed = False  # a token-id prompt has succeeded: never switch to text
        self.stats = RequestStats()
        self.heard = -math.inf  # when the server last showed life: a byte on any request, or a ping answered
        self.loops: dict[asyncio.AbstractEventLoop, LoopState] = {}
        self.sync = sync or client_for(options, self.timeout)
        self._ssl: Any = None  # one SSL context for every client made here (building one costs ~90 ms)

    def state(self) -> LoopState:
        """The running event loop's client and limit (made on first use)."""
        loop = asyncio.get_running_loop()
        state = self.loops.get(loop)
        if state is None:
            for dead in [lp for lp in self.loops if lp.is_closed()]:
                del self.loops[dead]  # a finished asyncio.run: its client cannot be closed any more
            if self.options.transport is not None:
                kwargs: dict[str, Any] = {"transport": self.options.transport}
                few = kwargs
            else:
                if self._ssl is None:
                    self._ssl = httpx.create_ssl_context()
                n = self.options.concurrency
                # a place in the limit may have a probe beside its stream (slot=False): room for both,
                # so such a probe never waits for a connection
                kwargs = {"limits": httpx.Limits(max_connections=2 * n, max_keepalive_connections=n), "verify": self._ssl}
                few = {"limits": httpx.Limits(max_connections=2, max_keepalive_connections=1), "verify": self._ssl}
            client = httpx.AsyncClient(timeout=self.timeout, headers=headers(self.options.api_key), **kwargs)
            pinger = httpx.AsyncClient(timeout=httpx.Timeout(self.options.timeout / 2), headers=headers(self.options.api_key), **few)
            state = self.loops[loop] = LoopState(client, Limit(self.options.concurrency, self.options.queue_timeout), pinger)
        return state

    def ping(self) -> None:
        """Ask a quiet server whether it is there (one ping at a time per loop); an answer counts as
        life (:class:`Heed`)."""
        state = self.state()
        if state.ping is None or state.ping.done():
            state.ping = asyncio.ensure_future(self._ping(state.pinger))

    async def _ping(self, pinger: httpx.AsyncClient) -> None:
        with suppress(httpx.HTTPError):
            response = await pinger.get(self.base_url + PING)
            if response.status_code == 200:
                self.heard = time.monotonic()

    async def backoff(self, attempt: int, response: httpx.Response | None = None) -> None:
        """Wait before retry ``attempt`` (0-based): doubling, jittered, at least a ``Retry-After``."""
        delay = self.options.backoff * (2**attempt) * (0.5 + random.random())
        if response is not None and response.headers.get("retry-after", "").isdigit():
            delay = max(delay, float(response.headers["retry-after"]))
        self.stats.retries += 1
        await asyncio.sleep(min(delay, 30.0))

    def unreachable(self, err: Exception) -> ServerError:
        if isinstance(err, httpx.TimeoutException):
            return timeout_error(self.base_url, self.timeout, err)
        return ServerUnreachable(
            f"the completions server at {self.base_url} is unreachable or dropped the connection "
            f"({type(err).__name__}) after {self.options.retries} retries; check that it is running"
        )

    def _raise_for(self, response: httpx.Response) -> None:
        raise upstream_error(response, self.base_url, self.options.retries + 1)

    async def _send(self, client: httpx.AsyncClient, path: str, prompt_ids: Sequence[int] | None, kind: str,
                    fields: dict[str, Any], stream: bool) -> httpx.Response:
        """Send one request until a 200 answer: 429/5xx and connection errors are retried with
        backoff. A 400/422 for a token-id prompt, while token ids never worked here, is re-sent
        once as text; only if that works does the engine switch to text prompts (llama-cpp-python
        takes no token ids), else the server's first error is raised. ``prompt_ids`` None: a
        request whose ``fields`` are its whole body (a chat request)."""
        attempt = 0
        as_text = self.text_prompts and prompt_ids is not None
        rejected: httpx.Response | None = None
        while True:
            body = {k: v for k, v in fields.items() if v is not None}
            if prompt_ids is not None:
                body = {"prompt": await self.as_text(prompt_ids) if as_text else list(prompt_ids), **body}
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
            route = ROUTE.get()  # the client request's routing key (codestop.engines.server.routing)
            request = client.build_request("POST", self.base_url + path, json=body, timeout=self.waiting,
                                           headers=None if route is None else route.headers)
            try:
                response = await Heed(self)(client.send(request, stream=stream))
                if route is not None:
                    route.answered(response.headers)
            except httpx.TimeoutException as err:
                raise self.unreachable(err) from None
            except httpx.TransportError as err:
                if attempt >= self.options.retries:
                    raise self.unreachable(err) from None
                await self.backoff(attempt)
                attempt += 1
                continue
            if response.status_code == 200:
                if prompt_ids is None:
                    return response
                if not as_text:
                    self._ids_confirmed = True
                elif not self.text_prompts and not self._ids_confirmed:
                    self.text_prompts = True
                    self.stats.text_fallbacks += 1
                return response
            await response.aread()
            await close_response(response)
            if response.status_code in RETRY_STATUSES and attempt < self.options.retries:
                await self.backoff(attempt, response)
                attempt += 1
                continue
            if (
                prompt_ids is not None and rejected is None and not as_text and not self._ids_confirmed
                and response.status_code in (400, 422) and not mentions_context(error_message(response))
            ):
                rejected, as_text = response, True
                continue
            self._raise_for(rejected or response)

    @asynccontextmanager
    async def _post(self, path: str, prompt_ids: Sequence[int] | None, kind: str, fields: dict[str, Any], stream: bool,
                    slot: bool = True, started: bool = False) -> AsyncIterator[httpx.Response]:
        """One request (see :meth:`_send`), holding a slot of the concurrency limit until closed;
        ``slot`` False: the session already holds one (a probe beside its own running stream, which
        must not wait behind other sessions' streams); ``started``: the session has received tokens,
        so its request goes before new sessions' (:class:`Limit`)."""
        state = self.state()
        async with state.limit.hold(started) if slot else nullcontext():
            response = await self._send(state.client, path, prompt_ids, kind, fields, stream)
            try:
                yield response
            finally:
                await close_response(response)  # completes even if this task is being cancelled

    async def complete(self, path: str, prompt_ids: Sequence[int], kind: str, fields: dict[str, Any],
                       parse: Callable[[dict[str, Any]], Chunk] = parse_choice, slot: bool = True,
                       started: bool = False) -> Chunk:
        """One plain (non-streaming) completion."""
        async with self._post(path, prompt_ids, kind, fields, stream=False, slot=slot, started=started) as response:
            return parse(parse_json(response.content, self.base_url))

    async def stream(self, prompt_ids: Sequence[int], kind: str, fields: dict[str, Any], slot: bool = True,
                     started: bool = False) -> AsyncGenerator[Chunk, None]:
        """One streaming completion, one chunk per read from the connection: the events that read
        brought, merged (the server's own batching, vLLM's ``--stream-interval``, and whatever
        queued up while the proxy was busy, so a loaded proxy handles fewer, bigger chunks).
        Closing the generator closes the connection, which aborts the request on the server; a
        connection broken mid-stream raises (the session resumes from what it kept)."""
        async with self._post(COMPLETIONS, prompt_ids, kind, {**fields, "stream": True}, stream=True, slot=slot,
                              started=started) as response, aclosing(self._events(response)) as reads:
            async for payloads in reads:
                yield merge([parse_choice(p) for p in payloads])

    async def payloads(self, path: str, kind: str, body: dict[str, Any], stream: bool,
                       started: bool = False) -> AsyncGenerator[dict[str, Any], None]:
        """One request whose ``body`` is all of it (a chat request), on the path every request
        takes (the limit, retries, the server's silence): its answer's JSON, or with ``stream``
        each event's payload. Closing the generator closes the connection."""
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with self._post(path, None, kind, body, stream=stream, started=started) as response:
            if not stream:
                data = parse_json(response.content, self.base_url)
                if not isinstance(data, dict):
                    raise ServerError(f"the completions server at {self.base_url} answered {redact(repr(data))[:200]}, not an object")
                yield data
                return
            async with aclosing(self._events(response)) as reads:
                async for read in reads:
                    for payload in read:
                        yield payload

    async def _events(self, response: httpx.Response) -> AsyncGenerator[list[dict[str, Any]], None]:
        """The one reader of a server's SSE: the JSON payloads of the events each read from the
        connection brought, up to ``[DONE]``; an error event raises once the payloads before it
        are given. Each wait for a byte is heeded (:class:`Heed`)."""
        body = response.aiter_bytes()
        text = codecs.getincrementaldecoder("utf-8")()
        rest = ""
        finished = False  # the server said it is done (a finish reason): what is left of the body is its end
        heed = Heed(self)
        try:
            while (raw := await heed(anext(body, None))) is not None:
                rest += text.decode(raw)
                if "\r" in rest:
                    rest = rest.replace("\r\n", "\n")  # SSE's other line end
                *events, rest = rest.split("\n\n")
                payloads, done, failed = self._read_events(events)
                if payloads:  # what came before the end (or an error event) is read first
                    finished = finished or any(c.get("finish_reason") for p in payloads for c in p.get("choices") or ())
                    yield payloads
                if failed is not None:
                    raise failed
                if done:
                    finished = True
                    return
            # the body ended without the blank line after its last event
            payloads, _, failed = self._read_events([rest + text.decode(b"", final=True)])
            if payloads:
                yield payloads
            if failed is not None:
                raise failed
        finally:
            if finished:
                # closed after the server said it is done: read the body's end ([DONE], which
                # follows at once), so the connection is kept for the next request, not closed
                with suppress(httpx.HTTPError):
                    async for _ in body:
                        pass

    def _read_events(self, events: list[str]) -> tuple[list[dict[str, Any]], bool, ServerError | ContextTooLong | None]:
        """The payloads of server-sent ``events`` up to ``[DONE]``; whether it came; the error an
        error event raised (the payloads before it are still read)."""
        payloads: list[dict[str, Any]] = []
        try:
            for event in events:
                for line in event.split("\n") if "\n" in event else (event,):
                    if line.startswith("data:"):
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            return payloads, True, None
                        if isinstance(data := self._payload(payload), dict):
                            payloads.append(data)
        except (ServerError, ContextTooLong) as err:
            return payloads, False, err
        return payloads, False, None

    def _payload(self, payload: str) -> Any:
        data = parse_json(payload, self.base_url)
        if isinstance(data, dict) and data.get("error"):
            err = data["error"]
            msg = redact(str(err.get("message") if isinstance(err, dict) else err))
            if mentions_context(msg):
                raise ContextTooLong(f"the completions server says: {msg}")
            raise ServerError(f"the completions server failed mid-stream: {msg}", 502)
        return data

    def connections(self) -> dict[str, int]:
        """The upstream connections in every event loop's pool and the blocking client's (the
        tokenizer's): ``in_use`` (checked out for a request, or connecting) and ``idle`` (kept for
        the next one; one the server has hung up on sits in CLOSE-WAIT until the pool looks at it
        again). ``in_use`` stays above zero with no request in flight only if a connection leaked.
        A custom ``transport`` has no pool to count: nothing is counted there."""
        out = {"in_use": 0, "idle": 0}
        for client in [state.client for state in list(self.loops.values())] + [self.sync]:
            pool = getattr(getattr(client, "_transport", None), "_pool", None)  # httpx's, to httpcore's pool
            for conn in list(getattr(pool, "connections", ())):
                out["idle" if conn.is_idle() else "in_use"] += 1
        return out

    async def aclose(self) -> None:
        """Close every client: each event loop's (the current loop's here, one of a loop running in
        another thread there; a closed loop's client cannot be closed any more and is dropped) and
        the sync one."""
        current = asyncio.get_running_loop()
        states, self.loops = self.loops, {}
        for loop, state in states.items():
            if loop is current:
                await _close(state)
            elif loop.is_running() and not loop.is_closed():
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_close(state), loop))
        self.sync.close()


async def _close(state: LoopState) -> None:
    if state.ping is not None:
        state.ping.cancel()
        await asyncio.gather(state.ping, return_exceptions=True)
    await state.client.aclose()
    await state.pinger.aclose()


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def client_for(options: ServerOptions, timeout: httpx.Timeout | None = None) -> httpx.Client:
    """A blocking client with the options' key, timeouts and transport."""
    timeout = timeout or httpx.Timeout(options.timeout, connect=options.connect_timeout)
    return httpx.Client(timeout=timeout, headers=headers(options.api_key), transport=options.transport)
