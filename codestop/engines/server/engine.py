"""The completions-server engine: any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang,
llama.cpp's server) drives the reasoning, codestop only decides when to stop.

Connecting (:mod:`~codestop.engines.server.discovery`) reads ``/v1/models``: the served model,
the server's kind (``owned_by``, which picks its :mod:`~codestop.engines.server.dialects` dialect)
and context window. Prompts go as token ids (no re-tokenisation drift, the prefix cache is hit).

Tokenisation: ``tokenizer`` (a Hugging Face tokenizer name, directory or .gguf file) when given;
otherwise the server's own ``/tokenize`` and ``/detokenize`` (cached), with token bytes learned
from what the server reports. That remote tokenizer is blocking HTTP, so the engine runs tokenizer
and template calls in a worker thread (:meth:`ServerEngine.run_tokenizer`), and fetches unknown
pieces with the async client before the step loop decodes them. The chat template: the
tokenizer's, else the server's rendering, else ChatML.

EOS: from ``tokenizer`` or llama.cpp's ``/props`` when connecting; vLLM says neither, but lists the
EOS it stopped at as the last token, which the engine learns before that token reaches a scanner,
so it never shows up as text.

Starting before the upstream (``connect(..., wait=False)``, as under an orchestrator): the engine
connects on the first :meth:`ServerEngine.health` or :meth:`ServerEngine.ready` that reaches the
server (at most one attempt a second); until then ``health`` says ``"starting"`` and sessions fail
with a 503 :class:`ServerError`, or the 504 :class:`ServerTimeout` when they waited ``timeout`` for a
server that accepts connections and stays silent.

The API key defaults to ``$CODESTOP_UPSTREAM_API_KEY``, else ``$OPENAI_API_KEY``, so it need not
appear on a command line.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import httpx

from codestop.engines.base import CounterKey, Engine
from codestop.engines.server.dialects import CHAT, GENERIC, Request
from codestop.engines.server.discovery import Upstream, api_key_from_env, discover, load_tokenizer
from codestop.engines.server.options import ServerOptions
from codestop.engines.server.session import ServerSession
from codestop.engines.server.tokenizer import NO_BLOCKING, NotConnected, RemoteTokens, WouldBlock, check_blocking
from codestop.engines.server.transport import Chunk, Transport, client_for, error_message
from codestop.engines.tokens import HFTokens, Tokens
from codestop.errors import CodestopError, ServerError, ServerTimeout, ServerUnreachable
from codestop.sampling import Sampling
from codestop.steps import StepRules

HEALTH_TIMEOUT_S = 5.0
RECONNECT_INTERVAL_S = 1.0  # least time between two attempts to reach an upstream that is starting


class ServerEngine(Engine):
    """An OpenAI-compatible completions server as an engine. Build it with :meth:`connect`, or
    from an :class:`Upstream` already known (``None``: not reached yet, see :meth:`ready`)."""

    name = "server"

    def __init__(self, base_url: str, upstream: Upstream | None, options: ServerOptions | None = None, *,
                 sync_client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.options = options = options or ServerOptions()
        self.transport = Transport(self.base_url, options, self._prompt_text, sync_client)
        self._template_cache: dict[str, str] = {}
        # connecting later (wait=False): what to ask the server for, and how the last attempt went
        self._wanted: tuple[str | None, HFTokens | None] = (None, None)
        self._connect_lock = threading.Lock()
        self._last_attempt = -float("inf")
        self._last_error = ""
        self._fatal = False  # the server answered, but not as asked (unknown model, key refused)
        self._timed_out_at = -float("inf")  # when the last attempt ended by the server staying silent
        self.connected = False
        self.model_name = ""
        self.served_models: list[str] = []
        self.dialect = GENERIC
        self.tokens: Tokens = NotConnected()
        self._chat_template_text = ""
        self._eos: frozenset[int] = frozenset()
        if upstream is not None:
            self._adopt(upstream)

    # -- connecting ----------------------------------------------------------------------------
    @classmethod
    def connect(cls, base_url: str | None = None, *, model: str | None = None, tokenizer: str | Any | None = None,
                wait: bool = True, **options: Any) -> ServerEngine:
        """Connect to the server at ``base_url`` (e.g. ``http://127.0.0.1:8000`` or ``.../v1``) and
        read what it serves. ``model``: the served model's name (default: the server's first);
        ``tokenizer``: a Hugging Face tokenizer (name, directory, .gguf file or object); ``options``:
        :class:`ServerOptions` fields (``api_key`` defaults to ``$CODESTOP_UPSTREAM_API_KEY``, else
        ``$OPENAI_API_KEY``); another name is an error naming it. ``wait=False``: a server that
        cannot be reached yet (still starting) gives an engine that connects later (see
        :meth:`ready`) instead of an error; a server that answers wrongly is still an error now."""
        opts = ServerOptions.of(options)
        if not base_url:
            raise CodestopError("base_url: the server engine needs --base-url, e.g. http://127.0.0.1:8000/v1")
        root = base_url.rstrip("/").removesuffix("/v1")
        if not root.startswith(("http://", "https://")):
            raise CodestopError(f"base_url: {base_url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1")
        if opts.api_key is None:
            opts = replace(opts, api_key=api_key_from_env())
        client = client_for(opts)
        try:
            hf = load_tokenizer(tokenizer)  # a bad --tokenizer fails now, server or not
            try:
                up = discover(client, root, model, hf)
            except (ServerUnreachable, ServerTimeout):
                if wait:
                    raise
                up = None
            engine = cls(root, up, opts, sync_client=client)
            engine._wanted = (model, hf)
            if up is None:
                engine.model_name = model or ""
            return engine
        except BaseException:
            client.close()
            raise

    def _adopt(self, up: Upstream) -> None:
        self.model_name, self.dialect, self.tokens = up.model, up.dialect, up.tokens
        self.served_models = list(up.served) or [up.model]
        self.context_window, self._chat_template_text, self._eos = up.window, up.template, up.eos
        self.connected = True

    def _try_connect(self) -> None:
        """One attempt (blocking, at most one a second) to reach a server not reached yet; raises
        the 503 :meth:`_not_ready` when it fails, or the 504 :class:`ServerTimeout` when the caller
        waited out ``timeout`` for it (the server accepts connections and stays silent), its own
        attempt or the one it queued behind."""
        arrived = time.monotonic()
        with self._connect_lock:
            if self.connected:
                return
            if time.monotonic() - self._last_attempt < RECONNECT_INTERVAL_S:
                if self._timed_out_at > arrived:
                    raise ServerTimeout(self._last_error)
                raise self._not_ready()
            self._last_attempt = time.monotonic()
            model, tokenizer = self._wanted
            try:
                up = discover(self.transport.sync, self.base_url, model, tokenizer)
            except ServerTimeout as err:
                self._last_error, self._fatal, self._timed_out_at = str(err), False, time.monotonic()
                raise ServerTimeout(str(err)) from None
            except ServerUnreachable as err:
                self._last_error, self._fatal = str(err), False
                raise self._not_ready() from None
            except CodestopError as err:
                self._last_error, self._fatal = str(err), True
                raise self._not_ready() from None
            self._adopt(up)

    def _not_ready(self) -> ServerError:
        if self._fatal:
            return ServerError(f"the completions server at {self.base_url} is up but unusable: {self._last_error}", 503)
        why = f" ({self._last_error})" if self._last_error else ""
        return ServerError(
            f"the completions server at {self.base_url} is not ready yet (still starting?){why}; retry shortly", 503
        )

    async def ready(self) -> None:
        """Connect now if the server was not reached yet; a 503 ServerError while it cannot be (a
        504 ServerTimeout when the attempt waited out ``timeout``). Instant once connected: call it
        before starting a question."""
        if not self.connected:
            await asyncio.to_thread(self._try_connect)

    def _require_connected(self) -> None:
        if not self.connected:
            raise self._not_ready()

    # -- tokenizer -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        self._require_connected()
        return self.tokens.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        self._require_connected()
        return self.tokens.detokenize(ids)

    async def run_tokenizer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The server's own tokenizer and template are blocking HTTP calls: run them in a worker
        thread so the event loop (and every other session on it) never waits on them."""
        await self.ready()
        if isinstance(self.tokens, RemoteTokens):
            blocking = NO_BLOCKING.set(True)
            try:
                return fn(*args)  # tried here first: an answer already cached needs no thread
            except WouldBlock:
                pass
            finally:
                NO_BLOCKING.reset(blocking)
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def ensure_decodable(self, ids: Sequence[int]) -> None:
        """Make ``ids`` decodable without a blocking call (unknown pieces fetched asynchronously)."""
        if isinstance(self.tokens, RemoteTokens) and not self.tokens.knows(ids):
            await self.tokens.fetch(self.transport.state().client, ids)

    async def _prompt_text(self, ids: Sequence[int]) -> str:
        await self.ensure_decodable(ids)
        return self.detokenize(ids)

    async def chunk_ids(self, chunk: Chunk) -> list[int]:
        """The ids of a chunk's tokens, decodable without blocking: as the server reports them,
        else (a server that gives only text) by tokenizing the text, which can drift at seams."""
        if isinstance(self.tokens, RemoteTokens):
            self.tokens.learn(chunk.pieces)
        ids = chunk.ids
        if (ids is None or not ids) and chunk.text:
            if isinstance(self.tokens, RemoteTokens):
                ids = await self.tokens.atokenize(self.transport.state().client, chunk.text)
            else:
                ids = self.tokens.tokenize(chunk.text)
        await self.ensure_decodable(ids or [])
        return list(ids or [])

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def learn_eos(self, token_id: int) -> None:
        """A token the server says it stopped at as end-of-sequence (vLLM names no EOS otherwise)."""
        if token_id not in self._eos:
            self._eos = self._eos | {token_id}

    def chat_template(self, messages: list[dict[str, str]], **template_kwargs: Any) -> str:
        """The model's template: the tokenizer's; else the server's (llama.cpp ``/apply-template``,
        vLLM ``/tokenize`` with messages); else ChatML, which most open models speak. A server that
        does not answer is an error, not a reason to guess the template."""
        self._require_connected()
        key = json.dumps([messages, template_kwargs], sort_keys=True)
        cached = self._template_cache.get(key)
        if cached is not None:
            return cached
        if isinstance(self.tokens, HFTokens):
            rendered = self.tokens.render(messages, **template_kwargs)
        else:
            check_blocking()
            try:
                rendered = self.dialect.render(self.transport.sync, self.base_url, self.model_name, messages,
                                               template_kwargs, self.detokenize)
            except httpx.TransportError as err:
                raise self.transport.unreachable(err) from None
            except (httpx.HTTPError, ValueError):
                rendered = None
        if rendered is None:
            rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            rendered += "<|im_start|>assistant\n"
        if len(self._template_cache) > 1024:
            self._template_cache.clear()
        self._template_cache[key] = rendered
        return rendered

    def model_info(self) -> dict[str, Any]:
        self._require_connected()
        return {"name": self.model_name, "model_type": "", "chat_template": self._chat_template_text}

    def default_sampling(self) -> Sampling:
        # unset fields are left to the server, which applies the model's generation config (vLLM)
        return Sampling()

    # -- requests --------------------------------------------------------------------------------
    def stops_for(self, rules: StepRules) -> tuple[list[str], bool]:
        """The stop strings a request for ``rules`` carries, never more than ``max_stops``: what
        ends the reasoning or an answer first (stop texts, a box's "}"), then separators, then
        boundary words; and whether that is all of them (else the scanner finds the rest in a
        stream)."""
        cap = self.options.max_stops or self.dialect.max_stops
        wanted = list(dict.fromkeys([*rules.stop_texts, *(["}"] if rules.close_box else []), *rules.separators, *rules.words]))
        return wanted[:cap], len(wanted) <= cap

    def step_chunks(self, prompt_ids: Sequence[int], max_tokens: int, rules: StepRules, sampling: Sampling,
                    streamed: bool, started: bool = False) -> AsyncGenerator[Chunk, None]:
        """One step request, shaped by the dialect (see :meth:`Dialect.step_request`); ``started``:
        the session has received tokens (its request goes first, see :class:`~codestop.engines.server.waiting.Limit`)."""
        request = self.dialect.step_request(max_tokens, self.stops_for(rules)[0], streamed)
        kind = "answer" if rules.greedy else "step"
        return self._chunks(request, prompt_ids, kind, self.dialect.sampling_fields(sampling), True, started)

    def probe_chunks(self, prompt_ids: Sequence[int], max_tokens: int, slot: bool = True,
                     started: bool = False) -> AsyncGenerator[Chunk, None]:
        """One probe request, greedy with logprobs (see :meth:`Dialect.probe_request`)."""
        return self._chunks(self.dialect.probe_request(max_tokens), prompt_ids, "probe", {}, slot, started)

    def _chunks(self, request: Request, prompt_ids: Sequence[int], kind: str, sampling: dict[str, Any],
                slot: bool = True, started: bool = False) -> AsyncGenerator[Chunk, None]:
        fields = {"model": self.model_name, **sampling, **request.fields}
        if request.stream:
            return self.transport.stream(prompt_ids, kind, fields, slot, started)
        return _once(self.transport.complete(request.path, prompt_ids, kind, fields, request.parse, slot, started))

    def chat(self, messages: list[dict[str, Any]], prefix: str, fields: dict[str, Any], sampling: Sampling, *,
             stream: bool, started: bool = False) -> AsyncGenerator[dict[str, Any], None]:
        """One request to the server's chat endpoint (the answer phase of agents' requests): the
        dialect's body (:meth:`Dialect.chat_body`, continuing the assistant's ``prefix`` unless it
        is empty) with ``fields`` and ``sampling``, sent as every request is (the limit, retries,
        the server's silence, :meth:`Transport.payloads`): the answer's JSON, or with ``stream``
        each event's payload. ``started``: the client has received tokens (its request goes first,
        see :class:`~codestop.engines.server.waiting.Limit`)."""
        self._require_connected()
        body = self.dialect.chat_body(self.model_name, messages, prefix, {**self.dialect.sampling_fields(sampling), **fields})
        if body is None:
            raise CodestopError(f"the upstream ({self.dialect.name}) cannot continue a message in its chat endpoint "
                                "(vLLM and SGLang can)")
        return self.transport.payloads(CHAT, "chat", body, stream, started)

    # -- sessions, health, counters, closing -------------------------------------------------------
    async def start(self, prompt_ids: Sequence[int], sampling: Sampling, *, live: bool = False) -> ServerSession:
        await self.ready()
        self.check_prompt(prompt_ids)
        return ServerSession(self, list(prompt_ids), sampling, live)

    async def health(self) -> dict[str, Any]:
        """Whether the upstream answers now. Not reached yet: one attempt to connect (``upstream``
        "starting" while it fails, "error" when it answers but not as asked); reached: GET its
        /v1/models with a short timeout ("ok" or "unreachable"), refreshing ``served_models``."""
        out: dict[str, Any] = {"ok": False, "upstream": "unreachable", "base_url": self.base_url, "model": self.model_name}
        if not self.connected:
            try:
                await self.ready()
            except ServerError:
                return {**out, "upstream": "error" if self._fatal else "starting", "error": self._last_error}
            return {**out, "ok": True, "upstream": "ok", "model": self.model_name, "models": list(self.served_models)}
        try:
            r = await self.transport.state().client.get(self.base_url + "/v1/models", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError as err:
            return {**out, "error": type(err).__name__}
        if r.status_code != 200:
            return {**out, "error": f"{r.status_code}: {error_message(r)}"}
        try:
            served = [str(m["id"]) for m in r.json().get("data") or [] if isinstance(m, dict) and "id" in m]
        except (ValueError, AttributeError):
            served = []
        if served:
            self.served_models = served
        return {**out, "ok": True, "upstream": "ok", "models": list(self.served_models)}

    def counters(self) -> dict[str, dict[CounterKey, float]]:
        """Requests sent upstream by kind ("step", "answer", "probe", "chat", "tokenizer"), retries, and
        switches to text prompts."""
        stats = self.transport.stats
        kinds: dict[CounterKey, float] = {k: float(n) for k, n in stats.by_kind.items()}
        if isinstance(self.tokens, RemoteTokens) and self.tokens.requests:
            kinds["tokenizer"] = self.tokens.requests
        return {
            "upstream_requests": kinds,
            "upstream_retries": {"": stats.retries},
            "upstream_text_fallbacks": {"": stats.text_fallbacks},
        }

    def connections(self) -> dict[str, int]:
        """The upstream connections in use and idle (:meth:`Transport.connections`)."""
        return self.transport.connections()

    async def aclose(self) -> None:
        """Close every HTTP client this engine made (every event loop's, and the sync one)."""
        await self.transport.aclose()
        self.close()

    def close(self) -> None:
        """Close the sync clients (sync callers; :meth:`aclose` closes the async ones too)."""
        self.transport.sync.close()
        if isinstance(self.tokens, RemoteTokens):
            self.tokens.client.close()


async def _once(answer: Awaitable[Chunk]) -> AsyncGenerator[Chunk, None]:
    yield await answer
