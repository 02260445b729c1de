"""The completions-server engine: any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang,
llama.cpp's server) drives the reasoning, codestop only decides when to stop.

One request per reasoning step and one per probe; the server's prefix cache does the reuse, so a
probe costs about its own tokens. Prompts go as token ids (no re-tokenisation drift, the cache is
hit). Every request is async on one ``httpx.AsyncClient`` per event loop, under a concurrency limit,
with retries (429, 5xx, connection resets; a step broken mid-stream resumes from the tokens already
received; a request that makes no progress is re-sent at most ``retries`` times).

This module is transport only: every token id the server returns is fed to the one
:class:`~codestop.steps.StepScanner`, which decides where a step ends exactly as it does for the
in-process engines. Servers cap the ``stop`` list (vLLM and the OpenAI API at 4 strings), so a
request never carries more than ``max_stops``: what ends the reasoning or an answer first (the
family's stop texts, a box's closing brace), then the separators, then boundary words. A step whose
rules all fit is one plain request on servers that say exactly which tokens they generated: vLLM
(``include_stop_str_in_output``), SGLang (``no_stop_trim``), llama.cpp (its native ``/completion``
with ``return_tokens``); a stop string that is no boundary here ("Wait" inside "Waiting") just
continues the step with another request, and tokens a plain request returns after the end of the
step are not kept. A step whose boundary words do not fit, or whose text is shown live
(``start(..., live=True)``), is streamed (with the stops that fit, where the server keeps them) and
the scanner finds the rest client-side: the stream is closed where the scanner ends the step, which
aborts the request on the server.

A probe is a greedy request of at most ``max_tokens`` with ``logprobs``, fed to the same scanner
as in-process probes: plain with ``stop=["}"]`` where the server keeps the stop string, else
streamed and closed at the brace (llama.cpp drops the logprobs of a token that holds a stop string).
Never echo or prompt logprobs, which make vLLM skip its prefix cache.

Timeouts: ``timeout`` is the longest the server may stay silent (a read timeout between streamed
events, or for a whole plain answer), ``connect_timeout`` apart. A plain request asks for at most
``PLAIN_REQUEST_TOKENS`` tokens (a longer step continues with another request), so a healthy server
answers well within it and a hung one gives :class:`ServerTimeout` (the proxy's 504) once, after
``timeout``, never retried.

EOS: from ``tokenizer`` or llama.cpp's ``/props`` when connecting; vLLM says neither, but lists the
EOS it stopped at as the last token with ``finish_reason == "stop"`` and no ``stop_reason``, which
the engine learns before that token reaches a scanner, so it never shows up as text.

Starting before the upstream (``connect(..., wait=False)``, as under an orchestrator): the engine
connects on the first :meth:`ServerEngine.health` or :meth:`ServerEngine.ready` that reaches the
server (at most one attempt a second); until then ``health`` says ``"starting"`` and sessions fail
with a 503 :class:`ServerError`, or the 504 :class:`ServerTimeout` when they waited ``timeout`` for a
server that accepts connections and stays silent.

Server dialects. Checked against live servers: vLLM 0.32 (CPU build; the tests start one): ``owned_by:
vllm`` and ``max_model_len`` in ``/v1/models``; logprob tokens as ``token_id:N`` with
``return_tokens_as_token_ids``; the matched stop string as ``stop_reason`` (None for EOS, listed
as the last token); ``/tokenize`` (with ``messages`` it renders the chat template) and
``/detokenize``; at most 4 stop strings. llama.cpp's ``llama-server`` through xllamacpp:
``/v1/models`` (``owned_by: llamacpp``), ``/props``, ``/tokenize`` with pieces, ``/detokenize``,
``/apply-template``, streamed ``/v1/completions`` with chat-format logprobs (``id``, ``bytes``; the
EOS it stopped at is listed, with no bytes), and the native ``/completion`` (``tokens``, EOS
included; ``stop_type``, ``stopping_word``); text prompts through a proxy that refuses token ids as
llama-cpp-python does. Checked against source only: SGLang
(python/sglang/srt/entrypoints/openai/protocol.py and serving_completions.py: ids as the choice's
``token_ids`` with ``return_token_ids``, a delta per event when streamed; logprob tokens are text
only, so an SGLang without ``token_ids`` has its text re-tokenized; the matched stop as
``matched_stop``: the string, or the id of a stop token such as EOS; ``/v1/tokenize`` and
``/v1/detokenize``).

Tokenisation: ``tokenizer`` (a Hugging Face tokenizer name, directory or .gguf file) when given;
otherwise the server's own ``/tokenize`` and ``/detokenize`` (cached), with token bytes learned
from what the server reports. That remote tokenizer is blocking HTTP, so the engine runs tokenizer
and template calls in a worker thread (:meth:`ServerEngine.run_tokenizer`), and fetches unknown
pieces with the async client before the step loop decodes them.

The API key defaults to ``$CODESTOP_UPSTREAM_API_KEY``, else ``$OPENAI_API_KEY``, so it need not
appear on a command line.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx

from codestop.engines.base import CounterKey, Engine, ProbeOutput, Session, StepOutput
from codestop.errors import (
    CodestopError,
    ContextTooLong,
    ServerError,
    ServerTimeout,
    ServerUnreachable,
    redact,
)
from codestop.sampling import Sampling
from codestop.steps import StepEnd, StepRules, StepScanner

DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT_S = 60.0  # the longest silence from the server: between streamed events, or a plain answer
DEFAULT_CONNECT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 3
DEFAULT_MAX_STOPS = 4  # vLLM's and the OpenAI API's cap on a request's stop strings
# most tokens one plain request asks for: a plain answer is silent until done, so this keeps it
# well inside ``timeout`` on any working server (a longer step continues with another request)
PLAIN_REQUEST_TOKENS = 256
RECONNECT_INTERVAL_S = 1.0  # least time between two attempts to reach an upstream that is starting
API_KEY_ENV = ("CODESTOP_UPSTREAM_API_KEY", "OPENAI_API_KEY")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# servers that keep a stop string in the output when asked (so boundaries can be server-side stops)
KEEPS_STOP_STRINGS = {"vllm": {"include_stop_str_in_output": True}, "sglang": {"no_stop_trim": True}}
# servers where one plain request can end a step at a boundary and say exactly which tokens it
# generated: those that keep stop strings, and llama.cpp through its native /completion endpoint
PLAIN_STEPS = frozenset({*KEEPS_STOP_STRINGS, "llamacpp"})
# how a server is asked for the ids of the tokens it generated (llama.cpp lists them in logprobs)
TOKEN_IDS = {"vllm": {"return_tokens_as_token_ids": True}, "sglang": {"return_token_ids": True}}
PROBE_RULES = StepRules(close_box=True, greedy=True)

__all__ = ["RemoteTokens", "ServerEngine", "ServerError", "ServerSession", "ServerTimeout", "ServerUnreachable", "parse_logprobs"]


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


def parse_choice(data: dict[str, Any]) -> Chunk:
    """A ``/v1/completions`` answer or stream event (vLLM, SGLang and llama.cpp dialects)."""
    choices = data.get("choices") or []
    if not choices:
        return Chunk([], None)  # e.g. a usage-only stream event
    choice = choices[0]
    tokens = parse_logprobs(choice.get("logprobs"))
    ids = choice.get("token_ids")  # SGLang's (and newer vLLM's) return_token_ids
    if not isinstance(ids, list):
        ids = [t.id for t in tokens] if tokens is not None and all(t.id is not None for t in tokens) else None
    stop = choice.get("stop_reason")  # vLLM
    if stop is None:
        stop = choice.get("matched_stop")  # SGLang
    pieces = {t.id: t.piece for t in tokens or [] if t.id is not None and t.piece is not None}
    lps = [t.logprob for t in tokens] if tokens is not None else None
    return Chunk(ids, lps, choice.get("text") or "", choice.get("finish_reason"), stop, pieces)


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


def timeout_error(where: str, timeout: httpx.Timeout, err: httpx.TimeoutException) -> ServerTimeout:
    """The one error for a server that stays silent: 504, whichever call noticed it."""
    if isinstance(err, httpx.ConnectTimeout):
        return ServerTimeout(f"the completions server at {where} did not accept a connection within {timeout.connect:g} s; "
                             "it may be overloaded or hung")
    return ServerTimeout(f"the completions server at {where} did not answer within {timeout.read:g} s "
                         f"({type(err).__name__}); it may be overloaded or hung")


def _mentions_context(message: str) -> bool:
    low = message.lower()
    return "context" in low and ("exceed" in low or "length" in low or "too long" in low or "maximum" in low)


def _json(content: bytes, where: str) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise ServerError(f"the completions server at {where} answered with invalid JSON: {redact(repr(content[:200]))}") from None


# --------------------------------------------------------------------------------------------
# Tokenizers: a Hugging Face one, or the server's own over HTTP
# --------------------------------------------------------------------------------------------


class Tokens(Protocol):
    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


class HFTokens:
    """A Hugging Face tokenizer (the server model's)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def load(cls, name: str) -> HFTokens:
        from transformers import AutoTokenizer

        path = Path(name).expanduser()
        try:
            if path.suffix == ".gguf" and path.is_file():
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            else:
                tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CodestopError(
                f"tokenizer: could not load {name!r} ({first}); give the server model's Hugging Face "
                "tokenizer (a hub id reachable from here, a local directory or its .gguf file), or omit "
                "--tokenizer to use the server's own /tokenize"
            ) from None
        return cls(tok, name)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def eos_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return {eos} if isinstance(eos, int) else set()

    def chat_template_text(self) -> str:
        return getattr(self.tokenizer, "chat_template", "") or ""

    def render(self, messages: list[dict[str, str]], **kwargs: Any) -> str | None:
        if not self.chat_template_text():
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


_MISSING = object()


class RemoteTokens:
    """The server's own tokenizer over HTTP, cached. The sync methods block (the engine calls them
    in a worker thread); ``atokenize`` and ``fetch`` are their async twins for the event loop. Token
    bytes the server reports (llama.cpp's pieces and logprobs) are exact; a piece fetched as text
    is exact unless the token is part of a character: pass a Hugging Face tokenizer for servers
    that report no token bytes and models that split characters."""

    # (path, request body, key of the answer) for llama.cpp, vLLM, SGLang, llama-cpp-python
    TOKENIZE = (
        ("/tokenize", lambda text, model: {"content": text, "add_special": False, "parse_special": True, "with_pieces": True}, "tokens"),
        ("/tokenize", lambda text, model: {"model": model, "prompt": text, "add_special_tokens": False}, "tokens"),
        ("/v1/tokenize", lambda text, model: {"model": model, "prompt": text, "add_special_tokens": False}, "tokens"),
        ("/extras/tokenize", lambda text, model: {"input": text}, "tokens"),
    )
    DETOKENIZE = (
        ("/detokenize", lambda ids, model: {"tokens": ids}, "content"),
        ("/detokenize", lambda ids, model: {"model": model, "tokens": ids}, "prompt"),
        ("/v1/detokenize", lambda ids, model: {"model": model, "tokens": ids, "skip_special_tokens": False}, "text"),
        ("/extras/detokenize", lambda ids, model: {"tokens": ids}, "text"),
    )

    def __init__(self, client: httpx.Client, root: str, model: str) -> None:
        self.client = client
        self.root = root
        self.model = model
        self.pieces: dict[int, bytes] = {}
        self.requests = 0
        self._routes: dict[str, tuple[Any, ...]] = {}  # the route that answered, by kind
        self._cache: dict[str, list[int]] = {}

    def _candidates(self, kind: str) -> Sequence[tuple[Any, ...]]:
        chosen = self._routes.get(kind)
        return [chosen] if chosen else (self.TOKENIZE if kind == "tokenize" else self.DETOKENIZE)

    def _answer(self, kind: str, route: tuple[Any, ...], r: httpx.Response) -> Any:
        if r.status_code == 200:
            try:
                data = r.json()
            except ValueError:
                return _MISSING
            if isinstance(data, dict) and route[2] in data:
                self._routes[kind] = route
                return data[route[2]]
        return _MISSING

    def _fail(self, err: Exception | None = None) -> CodestopError:
        if isinstance(err, httpx.TimeoutException):
            return timeout_error(self.root, self.client.timeout, err)
        if err is not None:
            return ServerUnreachable(f"the completions server at {self.root} is unreachable ({type(err).__name__})")
        return CodestopError(
            f"tokenizer: the server at {self.root} offers no /tokenize endpoint codestop knows; "
            "pass --tokenizer with the model's Hugging Face tokenizer"
        )

    def _call(self, kind: str, arg: Any) -> Any:
        for route in self._candidates(kind):
            self.requests += 1
            try:
                r = self.client.post(self.root + route[0], json=route[1](arg, self.model))
            except httpx.HTTPError as err:
                raise self._fail(err) from None
            if (value := self._answer(kind, route, r)) is not _MISSING:
                return value
        raise self._fail()

    async def _acall(self, client: httpx.AsyncClient, kind: str, arg: Any) -> Any:
        for route in self._candidates(kind):
            self.requests += 1
            try:
                r = await client.post(self.root + route[0], json=route[1](arg, self.model))
            except httpx.HTTPError as err:
                raise self._fail(err) from None
            if (value := self._answer(kind, route, r)) is not _MISSING:
                return value
        raise self._fail()

    def _ids(self, text: str, raw: Any) -> list[int]:
        ids: list[int] = []
        for item in raw:
            if isinstance(item, dict):  # llama.cpp with_pieces: a string, or bytes when not UTF-8
                ids.append(int(item["id"]))
                piece = item.get("piece")
                if isinstance(piece, (str, list)):
                    self.pieces.setdefault(ids[-1], piece.encode() if isinstance(piece, str) else bytes(piece))
            else:
                ids.append(int(item))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[text] = ids
        return list(ids)

    def tokenize(self, text: str) -> list[int]:
        cached = self._cache.get(text)
        return list(cached) if cached is not None else self._ids(text, self._call("tokenize", text))

    async def atokenize(self, client: httpx.AsyncClient, text: str) -> list[int]:
        cached = self._cache.get(text)
        return list(cached) if cached is not None else self._ids(text, await self._acall(client, "tokenize", text))

    def learn(self, pieces: dict[int, bytes]) -> None:
        for i, piece in pieces.items():
            self.pieces.setdefault(i, piece)

    def missing(self, ids: Sequence[int]) -> list[int]:
        return list(dict.fromkeys(i for i in ids if i not in self.pieces))

    def detokenize(self, ids: Sequence[int]) -> str:
        for i in self.missing(ids):  # once per token id (special tokens carry no bytes in logprobs)
            self.pieces[i] = str(self._call("detokenize", [i])).encode()
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    async def fetch(self, client: httpx.AsyncClient, ids: Sequence[int]) -> None:
        """Fetch the pieces of ``ids`` not known yet, so that decoding them makes no request."""
        for i in self.missing(ids):
            self.pieces[i] = str(await self._acall(client, "detokenize", [i])).encode()


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class _LoopState:
    """What an event loop owns: its HTTP client and its concurrency limit (asyncio objects belong
    to one loop; the sync API runs each question in a fresh loop)."""

    client: httpx.AsyncClient
    limit: asyncio.Semaphore


@dataclass
class RequestStats:
    """What the engine sent (see :meth:`ServerEngine.counters`)."""

    retries: int = 0
    text_fallbacks: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


@dataclass
class Upstream:
    """What connecting learns about the server: the chosen model and every one it serves, its
    dialect (``owned_by``), context window, tokenizer, chat template and EOS ids."""

    model: str
    kind: str
    served: list[str]
    tokens: Tokens
    window: int | None = None
    template: str = ""
    eos: frozenset[int] = frozenset()


class _NotConnected:
    """The tokenizer of an engine that has not reached its server yet (the engine checks first)."""

    def tokenize(self, text: str) -> list[int]:
        raise ServerError("the completions server has not been reached yet", 503)

    def detokenize(self, ids: Sequence[int]) -> str:
        raise ServerError("the completions server has not been reached yet", 503)


def api_key_from_env() -> str | None:
    """The upstream key from the environment, so it need not be on a command line."""
    return next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)


class ServerEngine(Engine):
    """An OpenAI-compatible completions server as an engine. Build it with :meth:`connect`.

    ``stream_steps``: None streams a session's steps when it is live, when the server cannot end a
    plain request at a boundary, or when the step's stop strings exceed ``max_stops``; True or
    False forces it. ``transport``: an httpx transport for every client the engine makes (tests:
    ``httpx.MockTransport``)."""

    name = "server"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        server_kind: str,
        tokens: Tokens,
        api_key: str | None = None,
        context_window: int | None = None,
        chat_template_text: str = "",
        eos_ids: frozenset[int] = frozenset(),
        served_models: Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
        stream_steps: bool | None = None,
        max_stops: int = DEFAULT_MAX_STOPS,
        sync_client: httpx.Client | None = None,
        transport: Any = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency: {concurrency!r} must be >= 1")
        if retries < 0:
            raise ValueError(f"retries: {retries!r} must be >= 0")
        if not timeout > 0:
            raise ValueError(f"timeout: {timeout!r} must be > 0 seconds")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout: {connect_timeout!r} must be > 0 seconds")
        if not (isinstance(max_stops, int) and max_stops >= 1):
            raise ValueError(f"max_stops: {max_stops!r} must be an integer >= 1 (vLLM and OpenAI accept 4)")
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.server_kind = server_kind
        self.tokens = tokens
        self.api_key = api_key
        self.context_window = context_window
        self._chat_template_text = chat_template_text
        self._eos = eos_ids
        self.served_models: list[str] = list(served_models) if served_models is not None else [model]
        self.concurrency = concurrency
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.retries = retries
        self.backoff = backoff
        self.stream_steps = stream_steps
        self.max_stops = max_stops
        self.text_prompts = False  # switched on when only text prompts work on this server
        self._ids_confirmed = False  # a token-id prompt has succeeded: never switch to text
        self.stats = RequestStats()
        self._transport = transport
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._sync = sync_client or httpx.Client(timeout=self.timeout, headers=self._headers(), transport=transport)
        self._ssl: Any = None  # one SSL context for every client this engine makes (building one costs ~90 ms)
        self._template_cache: dict[str, str] = {}
        # connecting later (wait=False): what to ask the server for, and how the last attempt went
        self.connected = True
        self._wanted: tuple[str | None, Any] = (model or None, None)
        self._connect_lock = threading.Lock()
        self._last_attempt = -float("inf")
        self._last_error = ""
        self._fatal = False  # the server answered, but not as asked (unknown model, key refused)
        self._timed_out_at = -float("inf")  # when the last attempt ended by the server staying silent

    # -- connecting ----------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        base_url: str | None = None,
        *,
        model: str | None = None,
        api_key: str | None = None,
        tokenizer: str | Any | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
        stream_steps: bool | None = None,
        max_stops: int = DEFAULT_MAX_STOPS,
        wait: bool = True,
        transport: Any = None,
        **unknown: Any,
    ) -> ServerEngine:
        """Connect to the server at ``base_url`` (e.g. ``http://127.0.0.1:8000`` or ``.../v1``) and
        read what it serves. ``model``: the served model's name (default: the server's first);
        ``tokenizer``: a Hugging Face tokenizer (name, directory, .gguf file or object); ``api_key``:
        default ``$CODESTOP_UPSTREAM_API_KEY``, else ``$OPENAI_API_KEY``. ``wait=False``: a server
        that cannot be reached yet (still starting) gives an engine that connects later (see
        :meth:`ready`) instead of an error; a server that answers wrongly is still an error now. An
        option it does not take (a misspelt one, an in-process engine's) is an error naming it."""
        if unknown:
            accepted = [p for p in inspect.signature(cls.connect).parameters if p not in ("base_url", "unknown")]
            raise CodestopError(f"{', '.join(sorted(unknown))}: unknown option{'s' if len(unknown) > 1 else ''} of the "
                                f"server engine; it takes base_url, {', '.join(accepted)}")
        if not base_url:
            raise CodestopError("base_url: the server engine needs --base-url, e.g. http://127.0.0.1:8000/v1")
        root = base_url.rstrip("/").removesuffix("/v1")
        if not root.startswith(("http://", "https://")):
            raise CodestopError(f"base_url: {base_url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1")
        if api_key is None:
            api_key = api_key_from_env()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout), headers=headers, transport=transport)
        try:
            hf = cls._load_tokenizer(tokenizer)  # a bad --tokenizer fails now, server or not
            try:
                up = cls._discover(client, root, model, hf)
            except (ServerUnreachable, ServerTimeout):
                if wait:
                    raise
                up = None
            options: dict[str, Any] = {
                "api_key": api_key, "concurrency": concurrency, "timeout": timeout, "connect_timeout": connect_timeout,
                "retries": retries, "backoff": backoff, "stream_steps": stream_steps, "max_stops": max_stops,
                "sync_client": client, "transport": transport,
            }
            if up is not None:
                return cls(root, model=up.model, server_kind=up.kind, tokens=up.tokens, context_window=up.window,
                           chat_template_text=up.template, eos_ids=up.eos, served_models=up.served, **options)
            engine = cls(root, model=model or "", server_kind="", tokens=_NotConnected(), served_models=[], **options)
            engine.connected = False
            engine._wanted = (model, hf)
            return engine
        except BaseException:
            client.close()
            raise

    @staticmethod
    def _load_tokenizer(tokenizer: Any) -> HFTokens | None:
        if tokenizer is None or isinstance(tokenizer, HFTokens):
            return tokenizer
        if isinstance(tokenizer, str):
            return HFTokens.load(tokenizer)
        return HFTokens(tokenizer, getattr(tokenizer, "name_or_path", ""))

    @staticmethod
    def _discover(client: httpx.Client, root: str, model: str | None, tokenizer: HFTokens | None) -> Upstream:
        """Read what the server serves (blocking). A server that cannot be reached, or answers
        with a retryable status (a balancer in front of a server still starting), raises
        ServerUnreachable or ServerTimeout; one that answers wrongly, another CodestopError."""
        try:
            r = client.get(root + "/v1/models")
        except httpx.TimeoutException as err:
            raise timeout_error(root, client.timeout, err) from None
        except httpx.HTTPError as err:
            raise ServerUnreachable(
                f"base_url: cannot reach a completions server at {root} ({type(err).__name__}); "
                "check that it is running and the URL (host, port) is right"
            ) from None
        if r.status_code in (401, 403):
            raise CodestopError(
                f"api_key: the server at {root} refused the API key ({r.status_code}); pass --api-key "
                f"or set ${API_KEY_ENV[0]}"
            )
        if r.status_code in RETRY_STATUSES:
            raise ServerUnreachable(f"base_url: {root}/v1/models answered {r.status_code}: {error_message(r)}")
        if r.status_code != 200:
            raise ServerError(f"base_url: {root}/v1/models answered {r.status_code}: {error_message(r)}")
        served = [m for m in (_json(r.content, root).get("data") or []) if isinstance(m, dict)]
        if not served:
            raise CodestopError(f"base_url: the server at {root} lists no models")
        names = [str(m.get("id")) for m in served]
        chosen = next((m for m in served if m.get("id") == model), None) if model else served[0]
        if chosen is None:
            raise CodestopError(f"model: the server at {root} does not serve {model!r}; it serves {', '.join(names)}")
        model_id = str(chosen["id"])
        kind = str(chosen.get("owned_by") or "").lower()
        window = chosen.get("max_model_len") or (chosen.get("meta") or {}).get("n_ctx")
        props: dict[str, Any] = {}
        if kind == "llamacpp":
            try:
                pr = client.get(root + "/props")
                props = pr.json() if pr.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                props = {}
            window = (props.get("default_generation_settings") or {}).get("n_ctx") or window
        if tokenizer is not None:
            return Upstream(model_id, kind, names, tokenizer, int(window) if window else None,
                            tokenizer.chat_template_text(), frozenset(tokenizer.eos_ids()))
        tokens = RemoteTokens(client, root, model_id)
        eos: set[int] = set()
        eos_text = props.get("eos_token")
        if eos_text:
            ids = tokens.tokenize(str(eos_text))
            if len(ids) == 1:
                eos.add(ids[0])
        else:
            tokens.tokenize("a")  # fails clearly now when the server cannot tokenize
        # vLLM says no EOS anywhere: learned from the first completion that stops at it (see _scan)
        return Upstream(model_id, kind, names, tokens, int(window) if window else None,
                        str(props.get("chat_template") or ""), frozenset(eos))

    def _adopt(self, up: Upstream) -> None:
        self.model_name, self.server_kind, self.served_models, self.tokens = up.model, up.kind, up.served, up.tokens
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
                up = self._discover(self._sync, self.base_url, model, tokenizer)
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
        504 ServerTimeout when the attempt waited out ``timeout``). Instant once connected: call it before starting a question."""
        if not self.connected:
            await asyncio.to_thread(self._try_connect)

    def _require_connected(self) -> None:
        if not self.connected:
            raise self._not_ready()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

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
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _known(self, ids: Sequence[int]) -> None:
        """Make ``ids`` decodable without a blocking call (unknown pieces fetched asynchronously)."""
        if isinstance(self.tokens, RemoteTokens) and self.tokens.missing(ids):
            await self.tokens.fetch(self._state().client, ids)

    async def _chunk_ids(self, chunk: Chunk) -> list[int]:
        """The ids of a chunk's tokens, decodable without blocking: as the server reports them,
        else (a server that gives only text) by tokenizing the text, which can drift at seams."""
        if isinstance(self.tokens, RemoteTokens):
            self.tokens.learn(chunk.pieces)
        ids = chunk.ids
        if (ids is None or not ids) and chunk.text:
            if isinstance(self.tokens, RemoteTokens):
                ids = await self.tokens.atokenize(self._state().client, chunk.text)
            else:
                ids = self.tokens.tokenize(chunk.text)
        await self._known(ids or [])
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
        vLLM ``/tokenize`` with messages); else ChatML, which most open models speak."""
        self._require_connected()
        key = json.dumps([messages, template_kwargs], sort_keys=True)
        cached = self._template_cache.get(key)
        if cached is not None:
            return cached
        if isinstance(self.tokens, HFTokens):
            rendered = self.tokens.render(messages, **template_kwargs)
        else:
            rendered = self._server_template(messages, template_kwargs)
        if rendered is None:
            rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            rendered += "<|im_start|>assistant\n"
        if len(self._template_cache) > 1024:
            self._template_cache.clear()
        self._template_cache[key] = rendered
        return rendered

    def _server_template(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> str | None:
        """The server's rendering, or None where it has none (ChatML then). A server that does not
        answer is an error, not a reason to guess the template."""
        try:
            if self.server_kind == "llamacpp":
                r = self._sync.post(self.base_url + "/apply-template", json={"messages": messages, "chat_template_kwargs": kwargs})
                if r.status_code == 200 and "prompt" in r.json():
                    return str(r.json()["prompt"])
            elif self.server_kind == "vllm":
                body = {"model": self.model_name, "messages": messages, "add_generation_prompt": True,
                        "add_special_tokens": False, "chat_template_kwargs": kwargs}
                r = self._sync.post(self.base_url + "/tokenize", json=body)
                if r.status_code == 200 and "tokens" in r.json():
                    return self.detokenize(r.json()["tokens"])
        except httpx.TransportError as err:
            raise self._unreachable(err) from None
        except (httpx.HTTPError, ValueError):
            return None
        return None

    def model_info(self) -> dict[str, Any]:
        self._require_connected()
        return {"name": self.model_name, "model_type": "", "chat_template": self._chat_template_text}

    def default_sampling(self) -> Sampling:
        # unset fields are left to the server, which applies the model's generation config (vLLM)
        return Sampling()

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
            r = await self._state().client.get(self.base_url + "/v1/models", timeout=HEALTH_TIMEOUT_S)
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
        """Requests sent upstream by kind ("step", "answer", "probe", "tokenizer"), retries, and
        switches to text prompts."""
        kinds: dict[CounterKey, float] = {k: float(n) for k, n in self.stats.by_kind.items()}
        if isinstance(self.tokens, RemoteTokens) and self.tokens.requests:
            kinds["tokenizer"] = self.tokens.requests
        return {
            "upstream_requests": kinds,
            "upstream_retries": {"": self.stats.retries},
            "upstream_text_fallbacks": {"": self.stats.text_fallbacks},
        }

    async def aclose(self) -> None:
        """Close every HTTP client this engine made: each event loop's async client (the current
        loop's here, one of a loop running in another thread there; a closed loop's client cannot
        be closed any more and is dropped) and the sync one."""
        current = asyncio.get_running_loop()
        states, self._loops = self._loops, {}
        for loop, state in states.items():
            if loop is current:
                await state.client.aclose()
            elif loop.is_running() and not loop.is_closed():
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(state.client.aclose(), loop))
        self.close()

    def close(self) -> None:
        """Close the sync client (sync callers; :meth:`aclose` closes the async ones too)."""
        self._sync.close()
        if isinstance(self.tokens, RemoteTokens):
            self.tokens.client.close()

    # -- HTTP ------------------------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            for dead in [lp for lp in self._loops if lp.is_closed()]:
                del self._loops[dead]  # a finished asyncio.run: its client cannot be closed any more
            if self._transport is not None:
                kwargs: dict[str, Any] = {"transport": self._transport}
            else:
                if self._ssl is None:
                    self._ssl = httpx.create_ssl_context()
                limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
                kwargs = {"limits": limits, "verify": self._ssl}
            client = httpx.AsyncClient(timeout=self.timeout, headers=self._headers(), **kwargs)
            state = self._loops[loop] = _LoopState(client, asyncio.Semaphore(self.concurrency))
        return state

    def sampling_fields(self, sampling: Sampling) -> dict[str, Any]:
        fields: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}
        if sampling.top_k:
            fields["top_k"] = sampling.top_k
        return fields

    async def _body(self, prompt_ids: Sequence[int], as_text: bool, fields: dict[str, Any]) -> dict[str, Any]:
        if as_text:
            await self._known(prompt_ids)
        body: dict[str, Any] = {"model": self.model_name, "prompt": self.detokenize(prompt_ids) if as_text else list(prompt_ids)}
        body.update({k: v for k, v in fields.items() if v is not None})
        return body

    def _raise_for(self, response: httpx.Response) -> None:
        message = error_message(response)
        if response.status_code in (401, 403):
            raise ServerError(f"the completions server refused the API key ({response.status_code}): {message}", 502, response.status_code)
        if _mentions_context(message):
            raise ContextTooLong(f"the completions server says: {message}")
        raise ServerError(f"the completions server answered {response.status_code}: {message}", 502, response.status_code)

    async def _sleep_backoff(self, attempt: int, response: httpx.Response | None = None) -> None:
        delay = self.backoff * (2**attempt) * (0.5 + random.random())
        if response is not None and response.headers.get("retry-after", "").isdigit():
            delay = max(delay, float(response.headers["retry-after"]))
        self.stats.retries += 1
        await asyncio.sleep(min(delay, 30.0))

    def _unreachable(self, err: Exception) -> ServerError:
        if isinstance(err, httpx.TimeoutException):
            return timeout_error(self.base_url, self.timeout, err)
        return ServerUnreachable(
            f"the completions server at {self.base_url} is unreachable or dropped the connection "
            f"({type(err).__name__}) after {self.retries} retries; check that it is running"
        )

    def _no_progress(self, attempts: int, finish: str | None) -> ServerError:
        return ServerError(
            f"the completions server at {self.base_url} returned no new tokens {attempts} times in a row "
            f"(finish reason {finish!r}); it may be capping the request (its own context or max-tokens limit)"
        )

    async def _send(self, client: httpx.AsyncClient, path: str, prompt_ids: Sequence[int], kind: str, fields: dict[str, Any], stream: bool) -> httpx.Response:
        """Send one request until a 200 answer: 429/5xx and connection errors are retried with
        backoff. A 400/422 for a token-id prompt, while token ids never worked here, is re-sent
        once as text; only if that works does the engine switch to text prompts (llama-cpp-python
        takes no token ids), else the server's first error is raised."""
        attempt = 0
        as_text = self.text_prompts
        rejected: httpx.Response | None = None
        while True:
            body = await self._body(prompt_ids, as_text, fields)
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
            try:
                response = await client.send(client.build_request("POST", self.base_url + path, json=body), stream=stream)
            except httpx.TimeoutException as err:
                raise self._unreachable(err) from None
            except httpx.TransportError as err:
                if attempt >= self.retries:
                    raise self._unreachable(err) from None
                await self._sleep_backoff(attempt)
                attempt += 1
                continue
            if response.status_code == 200:
                if not as_text:
                    self._ids_confirmed = True
                elif not self.text_prompts and not self._ids_confirmed:
                    self.text_prompts = True
                    self.stats.text_fallbacks += 1
                return response
            await response.aread()
            await response.aclose()
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                await self._sleep_backoff(attempt, response)
                attempt += 1
                continue
            if (
                rejected is None and not as_text and not self._ids_confirmed and response.status_code in (400, 422)
                and not _mentions_context(error_message(response))
            ):
                rejected, as_text = response, True
                continue
            self._raise_for(rejected or response)

    @asynccontextmanager
    async def _post(self, path: str, prompt_ids: Sequence[int], kind: str, fields: dict[str, Any], stream: bool,
                    slot: bool = True) -> AsyncIterator[httpx.Response]:
        """One request (see :meth:`_send`), holding a slot of the concurrency limit until closed;
        ``slot`` False: the session already holds one (a probe beside its own running stream, which
        must not wait behind other sessions' streams)."""
        state = self._state()
        async with state.limit if slot else nullcontext():
            response = await self._send(state.client, path, prompt_ids, kind, fields, stream)
            try:
                yield response
            finally:
                await response.aclose()

    async def complete(self, prompt_ids: Sequence[int], kind: str, path: str = "/v1/completions",
                       parse: Callable[[dict[str, Any]], Chunk] = parse_choice, slot: bool = True, **fields: Any) -> Chunk:
        """One plain (non-streaming) completion."""
        async with self._post(path, prompt_ids, kind, fields, stream=False, slot=slot) as response:
            return parse(_json(response.content, self.base_url))

    async def stream(self, prompt_ids: Sequence[int], kind: str, slot: bool = True, **fields: Any) -> AsyncGenerator[Chunk, None]:
        """One streaming completion, event by event. Closing the generator closes the connection,
        which aborts the request on the server; a connection broken mid-stream raises (the session
        resumes from what it kept)."""
        async with self._post("/v1/completions", prompt_ids, kind, {**fields, "stream": True}, stream=True, slot=slot) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                data = _json(payload.encode(), self.base_url)
                if isinstance(data, dict) and data.get("error"):
                    err = data["error"]
                    msg = redact(str(err.get("message") if isinstance(err, dict) else err))
                    if _mentions_context(msg):
                        raise ContextTooLong(f"the completions server says: {msg}")
                    raise ServerError(f"the completions server failed mid-stream: {msg}", 502)
                yield parse_choice(data)

    def stops_for(self, rules: StepRules) -> tuple[list[str], bool]:
        """The stop strings a request for ``rules`` carries, never more than ``max_stops``: what
        ends the reasoning or an answer first (stop texts, a box's "}"), then separators, then
        boundary words; and whether that is all of them (else the scanner finds the rest in a
        stream)."""
        wanted = list(dict.fromkeys([*rules.stop_texts, *(["}"] if rules.close_box else []), *rules.separators, *rules.words]))
        return wanted[: self.max_stops], len(wanted) <= self.max_stops

    def step_chunks(self, prompt_ids: Sequence[int], max_tokens: int, rules: StepRules, sampling: Sampling,
                    streamed: bool) -> AsyncGenerator[Chunk, None]:
        """One step request: a stream (with the stops that fit, where the server keeps them in the
        output), or one plain answer of at most ``PLAIN_REQUEST_TOKENS`` that a server-side stop
        string ends at a boundary candidate."""
        kind = "answer" if rules.greedy else "step"
        fields = {**self.sampling_fields(sampling), **TOKEN_IDS.get(self.server_kind, {})}
        stops, _ = self.stops_for(rules)
        if stops and self.server_kind in KEEPS_STOP_STRINGS:
            fields.update(stop=stops, **KEEPS_STOP_STRINGS[self.server_kind])
        if streamed:
            return self.stream(prompt_ids, kind, max_tokens=max_tokens, logprobs=1, **fields)
        n = min(max_tokens, PLAIN_REQUEST_TOKENS)
        if self.server_kind == "llamacpp":
            return _once(self.complete(
                prompt_ids, kind, path="/completion", parse=parse_native, n_predict=n, stop=stops or None,
                return_tokens=True, n_probs=1, cache_prompt=True, **fields,
            ))
        return _once(self.complete(prompt_ids, kind, max_tokens=n, logprobs=1, **fields))

    def probe_chunks(self, prompt_ids: Sequence[int], max_tokens: int, slot: bool = True) -> AsyncGenerator[Chunk, None]:
        """One probe request, greedy with logprobs: plain with the stop "}" where the server keeps
        it in the output; elsewhere streamed and closed at the brace, since llama.cpp drops the
        logprobs of the token that holds a stop string (an answer token "2}" with them)."""
        fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1, **TOKEN_IDS.get(self.server_kind, {})}
        if self.server_kind in KEEPS_STOP_STRINGS:
            fields.update(stop=["}"], **KEEPS_STOP_STRINGS[self.server_kind])
            return _once(self.complete(prompt_ids, "probe", slot=slot, **fields))
        return self.stream(prompt_ids, "probe", slot=slot, **fields)


async def _once(answer: Awaitable[Chunk]) -> AsyncGenerator[Chunk, None]:
    yield await answer


# --------------------------------------------------------------------------------------------
# A session: one question's context as token ids
# --------------------------------------------------------------------------------------------


@dataclass
class _Ahead:
    """A reasoning request that streams on past step ends (overlapped probing): it was sent
    ``prompt`` and ``scanner.ids`` are the tokens received since, which the next steps take."""

    rules: StepRules
    prompt: list[int]
    scanner: StepScanner
    arrived: asyncio.Event
    task: asyncio.Task[None] | None = None

    def token(self, i: int) -> int | None:
        """The context's ``i``-th token, None if it has not arrived yet."""
        if i < len(self.prompt):
            return self.prompt[i]
        i -= len(self.prompt)
        return self.scanner.ids[i] if i < len(self.scanner.ids) else None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.scanner.ids)


class ServerSession(Session):
    """One question's committed context as token ids (``ids``, sent whole with every request) and
    a held-back boundary word (``pending``) that starts the next step.

    Overlapped probing (``extend(run_ahead=True)``): one streamed request reads the reasoning
    past every boundary (found client-side) while the caller probes each boundary with requests
    of their own on its prefix (which the server's prefix cache holds); a new reasoning request is
    needed only after a broken connection. Anything else the session is asked (an answer, an
    append, a rollback, ``halt``) cancels the stream first and counts the tokens it had received
    past the committed context as ``overrun``."""

    def __init__(self, engine: ServerEngine, prompt_ids: list[int], sampling: Sampling, live: bool = False) -> None:
        self.engine = engine
        self.ids = prompt_ids
        self.pending: list[int] = []
        self.sampling = sampling
        self.live = live
        self.overrun = 0
        self._ahead: _Ahead | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.ids) + len(self.pending)

    def streamed(self, rules: StepRules) -> bool:
        """Whether a step by ``rules`` is streamed: when its text is shown live, when the server
        cannot end a plain request at a boundary, or when its stop strings do not all fit in one
        request (the scanner then finds the rest client-side)."""
        eng = self.engine
        if eng.stream_steps is not None:
            return eng.stream_steps
        return self.live or eng.server_kind not in PLAIN_STEPS or not eng.stops_for(rules)[1]

    def _room(self, context: int) -> int:
        """Tokens a request may generate after ``context`` tokens of prompt (the server's limit)."""
        window = self.engine.context_window
        return window - context if window is not None else 1 << 60

    async def _scan(self, scanner: StepScanner, request: Callable[[list[int], int], AsyncGenerator[Chunk, None]],
                    logprobs: list[float] | None = None, on_feed: Callable[[], None] | None = None) -> AsyncGenerator[str, None]:
        """Feed every token the server generates to ``scanner`` until it ends the step, yielding the
        text it hands out. Requests continue after the tokens received: past a stop string that is
        no boundary here ("Waiting"), the server's own length limit, or a connection broken
        mid-stream; ``retries`` times at most without progress. ``logprobs`` collects the tokens';
        ``on_feed`` is called after each chunk's tokens are fed."""
        eng = self.engine
        idle = resumes = 0
        while scanner.end is None:
            fed = len(scanner.ids)
            finish: str | None = None
            stop: str | int | None = None
            try:
                async with aclosing(request(scanner.ids, scanner.max_tokens - fed)) as chunks:
                    async for chunk in chunks:
                        ids = await eng._chunk_ids(chunk)
                        if logprobs is not None:
                            if chunk.logprobs is None and ids:
                                raise ServerError(
                                    f"the completions server at {eng.base_url} returned no logprobs, which confidence "
                                    "needs; use a server that returns them (vLLM, SGLang, llama.cpp's llama-server; "
                                    "llama-cpp-python needs --logits_all true)"
                                )
                            lps = [float(lp or 0.0) for lp in chunk.logprobs or []]
                            logprobs += (lps + [0.0] * len(ids))[: len(ids)]
                        if chunk.finish == "stop" and chunk.stop is None and ids and eng.server_kind == "vllm":
                            # vLLM names no EOS but lists the one it stopped at, last: learnt before
                            # the scanner sees it, so its text ("<|im_end|>") is never kept
                            eng.learn_eos(ids[-1])
                            scanner.eos_ids = eng.eos_token_ids
                        for tok in ids:
                            if scanner.feed(tok) is not None:
                                break  # what a plain answer holds after the end is not kept
                        if on_feed is not None:
                            on_feed()
                        if scanner.end is not None:
                            break  # closing a stream aborts the request on the server
                        if chunk.finish:
                            finish, stop = chunk.finish, chunk.stop
                        if piece := scanner.take_text():
                            yield piece
            except httpx.TimeoutException as err:
                raise eng._unreachable(err) from None
            except httpx.TransportError as err:  # broken mid-stream: the next request resumes after what arrived
                if resumes >= eng.retries:
                    raise eng._unreachable(err) from None
                await eng._sleep_backoff(resumes)
                resumes += 1
                continue
            if scanner.end is not None:
                break
            if finish == "stop" and not isinstance(stop, str):
                scanner.end = StepEnd("eos", len(scanner.ids))  # an EOS (or stop token) the server did not list
            elif len(scanner.ids) > fed:
                idle = 0
            elif idle < eng.retries:
                await eng._sleep_backoff(idle)
                idle += 1
            else:
                raise eng._no_progress(idle + 1, finish)

    async def extend(self, max_tokens: int, rules: StepRules, *, run_ahead: bool = False) -> AsyncGenerator[str | StepOutput, None]:
        eng = self.engine
        ahead = self._ahead if run_ahead and self._ahead is not None and self._ahead.rules == rules else None
        if ahead is None:
            await self.halt()
        held, self.pending = self.pending, []
        await eng._known(held)
        room = self._room(len(self.ids) + 1)  # as in-process: the committed context and one token spare
        scanner = StepScanner(eng.detokenize, rules, eng.eos_token_ids, max(1, min(max_tokens, room)), held)
        sampling = self.sampling.greedy() if rules.greedy else self.sampling
        if run_ahead:
            if ahead is None:
                ahead = self._ahead = self._run_ahead(rules, sampling, self.ids + held, scanner.max_tokens - len(held))
            pieces = self._follow(ahead, scanner)
        else:
            streamed = self.streamed(rules)

            def request(ids: list[int], n: int) -> AsyncGenerator[Chunk, None]:
                return eng.step_chunks(self.ids + ids, n, rules, sampling, streamed)

            pieces = self._scan(scanner, request)
        async with aclosing(pieces) as texts:
            async for piece in texts:
                yield piece
        if piece := scanner.take_text():
            yield piece
        end = scanner.end
        assert end is not None
        self.ids += scanner.ids[: end.keep]
        self.pending = list(end.carry)
        yield StepOutput(scanner.ids[: end.keep], scanner.kept_text(), end.kind)

    def _run_ahead(self, rules: StepRules, sampling: Sampling, prompt: list[int], max_tokens: int) -> _Ahead:
        """Start one streamed request for the rest of the reasoning: it ends only where the
        reasoning does (stop texts, client stops, EOS, ``max_tokens``); the boundaries are found
        client-side by each step's own scanner."""
        eng = self.engine
        to_end = replace(rules, separators=(), words=())
        ahead = _Ahead(rules, prompt, StepScanner(eng.detokenize, to_end, eng.eos_token_ids, max(1, max_tokens)), asyncio.Event())

        def request(ids: list[int], n: int) -> AsyncGenerator[Chunk, None]:
            return eng.step_chunks(prompt + ids, n, to_end, sampling, streamed=True)

        async def read() -> None:
            try:
                async with aclosing(self._scan(ahead.scanner, request, on_feed=ahead.arrived.set)) as texts:
                    async for _ in texts:
                        pass
            finally:
                ahead.arrived.set()

        ahead.task = asyncio.create_task(read())
        return ahead

    async def _follow(self, ahead: _Ahead, scanner: StepScanner) -> AsyncGenerator[str, None]:
        """Feed ``scanner`` the running stream's tokens after the committed context, waiting for
        more as needed, until the step ends."""
        assert ahead.task is not None
        while scanner.end is None:
            token = ahead.token(len(self.ids) + len(scanner.ids))
            if token is not None:
                scanner.eos_ids = self.engine.eos_token_ids  # an EOS the stream learnt (vLLM) ends this step too
                scanner.feed(token)
                if piece := scanner.take_text():
                    yield piece
            elif ahead.task.done():
                ahead.task.result()  # the stream's error, if it failed
                # it ended where the tokens do not show it (an EOS the server did not list)
                kind = ahead.scanner.end.kind if ahead.scanner.end is not None else "eos"
                scanner.end = StepEnd(kind, len(scanner.ids))
            else:
                ahead.arrived.clear()
                await ahead.arrived.wait()

    async def halt(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.task is None:
            return
        ahead.task.cancel()  # closing its stream aborts the request on the server
        await asyncio.wait([ahead.task])
        if not ahead.task.cancelled():
            ahead.task.exception()  # retrieved: an error after the stop matters to no one
        self.overrun += max(0, ahead.length - len(self.ids))

    async def probe(self, prompt_ids: Sequence[int], max_tokens: int = 20) -> ProbeOutput:
        """A greedy continuation of context + ``prompt_ids`` through the same scanner as in-process
        probes (the "}" that closes the box ends it); never changes the session."""
        eng = self.engine
        base = self.ids + list(prompt_ids)
        room = self._room(len(base))
        if room < 1:
            return ProbeOutput([], [], len(prompt_ids))
        scanner = StepScanner(eng.detokenize, PROBE_RULES, eng.eos_token_ids, min(max_tokens, room))
        lps: list[float] = []
        slot = self._ahead is None  # beside its own running stream the session already holds a slot
        async with aclosing(self._scan(scanner, lambda ids, n: eng.probe_chunks(base + ids, n, slot), lps)) as pieces:
            async for _ in pieces:
                pass
        return ProbeOutput(list(scanner.ids), lps[: len(scanner.ids)], len(prompt_ids))

    async def append(self, ids: Sequence[int]) -> None:
        await self.halt()
        self.pending = []  # forcing after a word boundary: the held-back word is dropped, never said
        window = self.engine.context_window
        if window is not None and len(self.ids) + len(ids) >= window:
            raise ContextTooLong(f"the context would exceed the model's window of {window} tokens")
        self.ids += list(ids)

    async def rollback(self, n_tokens: int) -> None:
        await self.halt()
        self.pending = []
        del self.ids[n_tokens:]  # the next request sends the shorter prefix (the server's cache holds it)

    async def close(self) -> None:
        await self.halt()
        self.ids = []
        self.pending = []
