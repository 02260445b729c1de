"""The completions-server engine: any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang,
llama.cpp's server) drives the reasoning, codestop only decides when to stop.

One request per reasoning step and one per probe; the server's prefix cache does the reuse, so a
probe costs about its own tokens. Prompts go as token ids (no re-tokenisation drift, the cache is
hit) unless the server rejects them, then as text. Every request is async on one shared
``httpx.AsyncClient`` per event loop, under a concurrency limit, with timeouts and retries (429,
5xx, connection resets; a step broken mid-stream resumes from the tokens already received).

A step's tokens are checked against the boundaries with exactly the rules of
:class:`~codestop.engines.base.LocalSession` (a separator ends a step just after it; a word such as
"Wait" ends it just before, and its tokens are carried into the next step's prompt). Where the text
is shown live (:data:`LIVE_TEXT`) a step is streamed and the stream closed at the boundary, which
aborts the request on the server. Otherwise a step is one plain request with the boundaries as stop
strings, on servers that say exactly which tokens they generated: vLLM
(``include_stop_str_in_output``), SGLang (``no_stop_trim``), llama.cpp (its native ``/completion``
with ``return_tokens``); a stop string that is no boundary here (``Waiting``) just continues the
step. Plain requests cost the client a few ms of CPU per step; streams about a ms per token.

A probe is one greedy request of at most ``max_tokens`` with ``logprobs`` and ``stop=["}"]`` (a
nested brace continues it); never echo or prompt logprobs, which make vLLM skip its prefix cache.

Tokenisation: ``tokenizer`` (a Hugging Face tokenizer name, directory or .gguf file) when given;
otherwise the server's own ``/tokenize`` and ``/detokenize`` endpoints (llama.cpp, vLLM; the
llama-cpp-python server's ``/extras/tokenize``), cached, with token texts learned from the
log-probabilities the server returns.
"""

from __future__ import annotations

import asyncio
import json
import random
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from codestop.engines.base import (
    Boundaries,
    CodestopError,
    ContextTooLong,
    Engine,
    ProbeOutput,
    Sampling,
    Session,
    StepOutput,
    TextCallback,
    closing_brace_index,
    find_word_boundary,
)

DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT_S = 600.0  # one request: a long reasoning step on a busy server can take minutes
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# servers that keep a stop string in the output when asked (so boundaries can be server-side stops)
KEEPS_STOP_STRINGS = {"vllm": {"include_stop_str_in_output": True}, "sglang": {"no_stop_trim": True}}
# servers where one plain request can end a step at a boundary and say exactly which tokens it
# generated: those that keep stop strings, and llama.cpp through its native /completion endpoint
# (``return_tokens`` lists every generated id, the trimmed stop string's included)
PLAIN_STEPS = frozenset({*KEEPS_STOP_STRINGS, "llamacpp"})

LIVE_TEXT: ContextVar[bool] = ContextVar("codestop_live_text", default=False)
"""Set to True where a caller shows the text as it is generated (the proxy's streaming responses,
a live view): steps are then streamed token by token. Otherwise a step is one plain request where
the server allows it, which costs the client far less CPU."""
CHATML_FALLBACK = "chatml"


class ServerError(CodestopError):
    """The completions server failed a request; ``status`` is the HTTP status the proxy should give."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class ServerUnreachable(ServerError):
    pass


class ServerTimeout(ServerError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=504)


@dataclass
class Token:
    """One generated token as a server reports it: id (None when the server only gives text),
    natural-log probability (None without logprobs) and its text (None when unknown)."""

    id: int | None
    logprob: float | None
    text: str | None


@dataclass
class Chunk:
    """A piece of a completion: the tokens it carries, its text, and the finish reason when last."""

    tokens: list[Token]
    text: str
    finish_reason: str | None = None
    stop_reason: Any = None  # vLLM: the stop string that matched, None for EOS


# --------------------------------------------------------------------------------------------
# Parsing what servers return
# --------------------------------------------------------------------------------------------


def parse_logprobs(logprobs: Any) -> list[Token] | None:
    """The tokens of a completion choice's ``logprobs``, in either format servers use: the chat
    format (llama.cpp: ``{"content": [{"id", "token", "bytes", "logprob"}]}``) or the legacy
    completions format (vLLM, SGLang: ``{"tokens", "token_logprobs"}``; vLLM writes tokens as
    ``token_id:N`` when asked with ``return_tokens_as_token_ids``). None when there are none."""
    if not logprobs:
        return None
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        out = []
        for entry in logprobs["content"]:
            raw = entry.get("bytes")
            text = bytes(raw).decode("utf-8", errors="replace") if raw else entry.get("token")
            out.append(Token(entry.get("id"), entry.get("logprob"), text))
        return out
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        lps = logprobs.get("token_logprobs") or [None] * len(logprobs["tokens"])
        out = []
        for tok, lp in zip(logprobs["tokens"], lps):
            if isinstance(tok, str) and tok.startswith("token_id:") and tok[9:].lstrip("-").isdigit():
                out.append(Token(int(tok[9:]), lp, None))
            else:
                out.append(Token(None, lp, tok))
        return out
    return None


def parse_choice(data: dict[str, Any]) -> Chunk:
    choices = data.get("choices") or []
    if not choices:
        return Chunk([], "")
    choice = choices[0]
    tokens = parse_logprobs(choice.get("logprobs")) or []
    return Chunk(tokens, choice.get("text") or "", choice.get("finish_reason"), choice.get("stop_reason"))


def parse_native(data: dict[str, Any]) -> Chunk:
    """llama.cpp's native ``/completion`` answer (asked with ``return_tokens`` and ``n_probs``): every
    generated id, the texts of those it has probabilities for, how and where it stopped."""
    ids = [int(t) for t in data.get("tokens") or []]
    probs = data.get("completion_probabilities") or []
    texts: list[str | None] = [None] * len(ids)
    for i, entry in enumerate(probs[: len(ids)]):
        if isinstance(entry, dict) and entry.get("id") == ids[i]:
            raw = entry.get("bytes")
            texts[i] = bytes(raw).decode("utf-8", errors="replace") if raw else None
    stop_type = data.get("stop_type")
    finish = "length" if stop_type == "limit" else "stop"
    stop_reason = data.get("stopping_word") if stop_type == "word" else None
    return Chunk([Token(i, None, t) for i, t in zip(ids, texts)], str(data.get("content") or ""), finish, stop_reason)


def error_message(response: httpx.Response) -> str:
    """The server's own error message (OpenAI-style ``{"error": {"message"}}`` or FastAPI's
    ``{"detail"}``), else the start of the body."""
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


def _mentions_context(message: str) -> bool:
    low = message.lower()
    return "context" in low and ("exceed" in low or "length" in low or "too long" in low or "maximum" in low)


# --------------------------------------------------------------------------------------------
# Tokenizers: a Hugging Face one, or the server's own over HTTP
# --------------------------------------------------------------------------------------------


class TextAssembler:
    """Turns a growing list of token ids into text incrementally (O(1) per token), decoding a small
    window around the new token the way vLLM's incremental detokenizer does, so multi-byte
    characters split over tokens come out whole. ``ends[i]`` is the text length after token i."""

    WINDOW = 6

    def __init__(self, decode: Any, ids: Sequence[int] = ()) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.ends: list[int] = []
        self._emitted = 0  # tokens whose text is final
        for i in ids:
            self.add(i)

    def add(self, token_id: int, known_text: str | None = None) -> str:
        """Append a token; returns the text it added (maybe "" until a character completes)."""
        self.ids.append(token_id)
        start = max(self._emitted - self.WINDOW, 0)
        prefix = self.decode(self.ids[start : self._emitted]) if self._emitted > start else ""
        full = self.decode(self.ids[start:])
        if full.endswith("\ufffd"):  # an incomplete character: wait for the next token
            self.ends.append(len(self.text))
            return ""
        added = full[len(prefix) :]
        self.text += added
        self._emitted = len(self.ids)
        self.ends.append(len(self.text))
        return added

    def keep_before(self, at: int) -> int:
        """How many leading tokens end at or before text index ``at``."""
        keep = 0
        while keep < len(self.ends) and self.ends[keep] <= at:
            keep += 1
        return keep


class HFTokens:
    """A Hugging Face tokenizer (the server model's)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def load(cls, name: str) -> "HFTokens":
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


class RemoteTokens:
    """The server's own tokenizer over HTTP (sync; results cached). Token texts seen in
    log-probabilities are remembered, so decoding generated tokens rarely needs a request."""

    # (path, request body, key of the token list / of the text in the answer)
    TOKENIZE = (
        ("/tokenize", lambda text, model: {"content": text, "add_special": False, "parse_special": True, "with_pieces": True}, "tokens"),
        ("/tokenize", lambda text, model: {"model": model, "prompt": text, "add_special_tokens": False}, "tokens"),
        ("/extras/tokenize", lambda text, model: {"input": text}, "tokens"),
    )
    DETOKENIZE = (
        ("/detokenize", lambda ids, model: {"tokens": ids}, "content"),
        ("/detokenize", lambda ids, model: {"model": model, "tokens": ids}, "prompt"),
        ("/extras/detokenize", lambda ids, model: {"tokens": ids}, "text"),
    )

    def __init__(self, client: httpx.Client, root: str, model: str) -> None:
        self.client = client
        self.root = root
        self.model = model
        self.pieces: dict[int, bytes] = {}
        self._tok_route: tuple[Any, ...] | None = None
        self._detok_route: tuple[Any, ...] | None = None
        self._cache: dict[str, list[int]] = {}

    def _post(self, routes: Sequence[tuple[Any, ...]], chosen: tuple[Any, ...] | None, arg: Any) -> tuple[Any, tuple[Any, ...]]:
        for route in [chosen] if chosen else routes:
            path, body, key = route
            try:
                r = self.client.post(self.root + path, json=body(arg, self.model))
            except httpx.HTTPError as err:
                raise ServerUnreachable(f"the completions server at {self.root} is unreachable ({type(err).__name__})") from None
            if r.status_code == 200:
                data = r.json()
                if isinstance(data, dict) and key in data:
                    return data[key], route
        raise CodestopError(
            f"tokenizer: the server at {self.root} offers no /tokenize endpoint codestop knows; "
            "pass --tokenizer with the model's Hugging Face tokenizer"
        )

    def tokenize(self, text: str) -> list[int]:
        cached = self._cache.get(text)
        if cached is not None:
            return list(cached)
        raw, self._tok_route = self._post(self.TOKENIZE, self._tok_route, text)
        ids: list[int] = []
        for item in raw:
            if isinstance(item, dict):  # llama.cpp with_pieces
                ids.append(int(item["id"]))
                piece = item.get("piece")
                if isinstance(piece, str):
                    self.pieces.setdefault(ids[-1], piece.encode())
                elif isinstance(piece, list):
                    self.pieces.setdefault(ids[-1], bytes(piece))
            else:
                ids.append(int(item))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[text] = ids
        return list(ids)

    def learn(self, token: Token) -> None:
        if token.id is not None and token.text and token.id not in self.pieces:
            self.pieces[token.id] = token.text.encode()

    def detokenize(self, ids: Sequence[int]) -> str:
        for i in ids:
            if i not in self.pieces:  # once per token id (special tokens carry no bytes in logprobs)
                text, self._detok_route = self._post(self.DETOKENIZE, self._detok_route, [i])
                self.pieces[i] = str(text).encode()
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


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
    """Counters of what the engine sent, for the proxy's metrics and the benchmarks."""

    requests: int = 0
    retries: int = 0
    probe_requests: int = 0
    text_fallbacks: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class ServerEngine(Engine):
    """An OpenAI-compatible completions server as an engine. Build it with :meth:`connect`."""

    name = "server"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        server_kind: str,
        tokens: HFTokens | RemoteTokens,
        api_key: str | None = None,
        context_window: int | None = None,
        chat_template_text: str = "",
        eos_ids: frozenset[int] = frozenset(),
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
        stream_steps: bool | None = None,
        sync_client: httpx.Client | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency: {concurrency!r} must be >= 1")
        if retries < 0:
            raise ValueError(f"retries: {retries!r} must be >= 0")
        if not timeout > 0:
            raise ValueError(f"timeout: {timeout!r} must be > 0 seconds")
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.server_kind = server_kind
        self.tokens = tokens
        self.api_key = api_key
        self.context_window = context_window
        self._chat_template_text = chat_template_text
        self._eos = eos_ids
        self.concurrency = concurrency
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.retries = retries
        self.backoff = backoff
        self.text_prompts = False  # switched on when the server rejects token-id prompts
        self._ids_confirmed = False
        self.stats = RequestStats()
        self._loops: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]" = weakref.WeakKeyDictionary()
        self._sync = sync_client or httpx.Client(timeout=self.timeout, headers=self._headers())
        self._server_stops = KEEPS_STOP_STRINGS.get(server_kind)
        # steps are streamed when a caller shows them live, or when only a stream can end them at a
        # boundary (servers that trim stop strings); else one plain request per step, far less CPU
        self.stream_steps = stream_steps
        self._ssl = None  # one SSL context for every client this engine makes (building one costs ~90 ms)
        self._template_cache: dict[str, str] = {}

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
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
        stream_steps: bool | None = None,
        **_ignored: Any,
    ) -> "ServerEngine":
        """Connect to the server at ``base_url`` (e.g. ``http://127.0.0.1:8000`` or ``.../v1``) and
        read what it serves. ``model``: the served model's name (default: the server's first);
        ``tokenizer``: a Hugging Face tokenizer (name, directory, .gguf file or object)."""
        if not base_url:
            raise CodestopError("base_url: the server engine needs --base-url, e.g. http://127.0.0.1:8000/v1")
        root = base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        if not root.startswith(("http://", "https://")):
            raise CodestopError(f"base_url: {base_url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.Client(timeout=httpx.Timeout(timeout, connect=DEFAULT_CONNECT_TIMEOUT_S), headers=headers)
        try:
            r = client.get(root + "/v1/models")
        except httpx.HTTPError as err:
            client.close()
            raise ServerUnreachable(
                f"base_url: cannot reach a completions server at {root} ({type(err).__name__}); "
                "check that it is running and the URL (host, port) is right"
            ) from None
        if r.status_code in (401, 403):
            client.close()
            raise CodestopError(f"api_key: the server at {root} refused the API key ({r.status_code}); pass --api-key")
        if r.status_code != 200:
            client.close()
            raise ServerError(f"base_url: {root}/v1/models answered {r.status_code}: {error_message(r)}")
        served = [m for m in (r.json().get("data") or []) if isinstance(m, dict)]
        if not served:
            client.close()
            raise CodestopError(f"base_url: the server at {root} lists no models")
        if model:
            chosen = next((m for m in served if m.get("id") == model), None)
            if chosen is None:
                client.close()
                names = ", ".join(str(m.get("id")) for m in served)
                raise CodestopError(f"model: the server at {root} does not serve {model!r}; it serves {names}")
        else:
            chosen = served[0]
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
        if tokenizer is None:
            tokens: HFTokens | RemoteTokens = RemoteTokens(client, root, model_id)
            template = str(props.get("chat_template") or "")
            eos: set[int] = set()
            eos_text = props.get("eos_token")
            if eos_text:
                ids = tokens.tokenize(str(eos_text))
                if len(ids) == 1:
                    eos.add(ids[0])
            else:
                tokens.tokenize("a")  # fails clearly now when the server cannot tokenize
        else:
            tokens = tokenizer if isinstance(tokenizer, HFTokens) else (
                HFTokens.load(tokenizer) if isinstance(tokenizer, str) else HFTokens(tokenizer, getattr(tokenizer, "name_or_path", ""))
            )
            template = tokens.chat_template_text()
            eos = tokens.eos_ids()
        return cls(
            root,
            model=model_id,
            server_kind=kind,
            tokens=tokens,
            api_key=api_key,
            context_window=int(window) if window else None,
            chat_template_text=template,
            eos_ids=frozenset(eos),
            concurrency=concurrency,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            stream_steps=stream_steps,
            sync_client=client,
        )

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # -- tokenizer -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokens.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokens.detokenize(ids)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def chat_template(self, messages: list[dict[str, str]], **template_kwargs: Any) -> str:
        """The model's template: the tokenizer's; else the server's (llama.cpp ``/apply-template``,
        vLLM ``/tokenize`` with messages); else ChatML, which most open models speak."""
        key = json.dumps([messages, template_kwargs], sort_keys=True)
        cached = self._template_cache.get(key)
        if cached is not None:
            return cached
        rendered: str | None = None
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
        except (httpx.HTTPError, ValueError):
            return None
        return None

    def model_info(self) -> dict[str, Any]:
        return {"name": self.model_name, "model_type": "", "chat_template": self._chat_template_text}

    def default_sampling(self) -> Sampling:
        # unset fields are left to the server, which applies the model's generation config (vLLM)
        return Sampling()

    # -- sessions ------------------------------------------------------------------------------
    async def start(self, prompt_ids: Sequence[int], sampling: Sampling) -> "ServerSession":
        if not prompt_ids:
            raise ValueError("prompt_ids: the prompt is empty")
        if self.context_window is not None and len(prompt_ids) >= self.context_window:
            raise ContextTooLong(
                f"the prompt is {len(prompt_ids)} tokens but the model's context window is {self.context_window}; "
                "shorten the question or use a model with a longer context"
            )
        return ServerSession(self, list(prompt_ids), sampling)

    async def aclose(self) -> None:
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.aclose()

    def close(self) -> None:
        self._sync.close()

    # -- HTTP ------------------------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            client = httpx.AsyncClient(timeout=self.timeout, headers=self._headers(), limits=limits, verify=self._ssl)
            state = _LoopState(client, asyncio.Semaphore(self.concurrency))
            self._loops[loop] = state
        return state

    def _body(self, prompt_ids: Sequence[int], **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name}
        body["prompt"] = self.detokenize(prompt_ids) if self.text_prompts else list(prompt_ids)
        if self.server_kind == "vllm":
            fields.setdefault("return_tokens_as_token_ids", True)
        body.update({k: v for k, v in fields.items() if v is not None})
        return body

    def _raise_for(self, response: httpx.Response) -> None:
        message = error_message(response)
        if response.status_code in (401, 403):
            raise ServerError(f"the completions server refused the API key ({response.status_code}): {message}", 502)
        if _mentions_context(message):
            raise ContextTooLong(f"the completions server says: {message}")
        raise ServerError(f"the completions server answered {response.status_code}: {message}", 502)

    def _should_fall_back_to_text(self, response: httpx.Response) -> bool:
        return (
            not self.text_prompts
            and not self._ids_confirmed
            and response.status_code in (400, 422)
            and not _mentions_context(error_message(response))
        )

    async def _sleep_backoff(self, attempt: int, response: httpx.Response | None = None) -> None:
        delay = self.backoff * (2**attempt) * (0.5 + random.random())
        if response is not None and response.headers.get("retry-after", "").isdigit():
            delay = max(delay, float(response.headers["retry-after"]))
        self.stats.retries += 1
        await asyncio.sleep(min(delay, 30.0))

    def _unreachable(self, err: Exception) -> ServerError:
        if isinstance(err, httpx.TimeoutException):
            return ServerTimeout(
                f"the completions server at {self.base_url} did not answer within {self.timeout.read:g} s "
                f"({type(err).__name__}); it may be overloaded or hung"
            )
        return ServerUnreachable(
            f"the completions server at {self.base_url} is unreachable or dropped the connection "
            f"({type(err).__name__}) after {self.retries} retries; check that it is running"
        )

    async def complete(
        self,
        prompt_ids: Sequence[int],
        kind: str,
        path: str = "/v1/completions",
        parse: Callable[[dict[str, Any]], Chunk] = parse_choice,
        **fields: Any,
    ) -> Chunk:
        """One non-streaming completion (retried on 429/5xx/connection errors)."""
        state = self._state()
        attempt = 0
        while True:
            body = self._body(prompt_ids, **fields)
            try:
                async with state.limit:
                    self._count(kind)
                    response = await state.client.post(self.base_url + path, json=body)
            except httpx.TimeoutException as err:
                raise self._unreachable(err) from None
            except httpx.TransportError as err:
                if attempt >= self.retries:
                    raise self._unreachable(err) from None
                await self._sleep_backoff(attempt)
                attempt += 1
                continue
            if response.status_code == 200:
                self._ids_confirmed = True
                return parse(response.json())
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                await self._sleep_backoff(attempt, response)
                attempt += 1
                continue
            if self._should_fall_back_to_text(response):
                self.text_prompts = True
                self.stats.text_fallbacks += 1
                continue
            self._raise_for(response)

    async def stream(self, prompt_ids: Sequence[int], kind: str, **fields: Any) -> AsyncIterator[Chunk]:
        """One streaming completion, chunk by chunk. Closing the generator early closes the
        connection, which aborts the request on the server. Connection errors before the first
        chunk are retried; after it they propagate (the caller resumes from what it kept)."""
        state = self._state()
        attempt = 0
        while True:
            body = self._body(prompt_ids, stream=True, **fields)
            got_any = False
            try:
                async with state.limit:
                    self._count(kind)
                    async with state.client.stream("POST", self.base_url + "/v1/completions", json=body) as response:
                        if response.status_code != 200:
                            await response.aread()
                        else:
                            async for line in response.aiter_lines():
                                if not line.startswith("data:"):
                                    continue
                                payload = line[5:].strip()
                                if payload == "[DONE]":
                                    return
                                data = json.loads(payload)
                                if isinstance(data, dict) and data.get("error"):
                                    err = data["error"]
                                    msg = err.get("message") if isinstance(err, dict) else str(err)
                                    if _mentions_context(str(msg)):
                                        raise ContextTooLong(f"the completions server says: {msg}")
                                    raise ServerError(f"the completions server failed mid-stream: {msg}", 502)
                                self._ids_confirmed = True
                                got_any = True
                                yield parse_choice(data)
                            return
            except httpx.TimeoutException as err:
                raise self._unreachable(err) from None
            except httpx.TransportError as err:
                if got_any:
                    raise
                if attempt >= self.retries:
                    raise self._unreachable(err) from None
                await self._sleep_backoff(attempt)
                attempt += 1
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                await self._sleep_backoff(attempt, response)
                attempt += 1
                continue
            if self._should_fall_back_to_text(response):
                self.text_prompts = True
                self.stats.text_fallbacks += 1
                continue
            self._raise_for(response)

    def _count(self, kind: str) -> None:
        self.stats.requests += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1

    def sampling_fields(self, sampling: Sampling) -> dict[str, Any]:
        fields: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}
        if sampling.top_k:
            fields["top_k"] = sampling.top_k
        return fields


def _learn(engine: ServerEngine, tokens: Sequence[Token]) -> None:
    if isinstance(engine.tokens, RemoteTokens):
        for t in tokens:
            engine.tokens.learn(t)


def _token_ids(engine: ServerEngine, chunk: Chunk) -> list[int]:
    """The ids of a chunk's tokens: from the logprobs when the server gives ids, else by
    tokenizing the chunk's text (a fallback that can drift at token seams)."""
    if chunk.tokens and all(t.id is not None for t in chunk.tokens):
        return [int(t.id) for t in chunk.tokens]  # type: ignore[arg-type]
    return engine.tokenize(chunk.text) if chunk.text else []


# --------------------------------------------------------------------------------------------
# A session: one question's context as token ids
# --------------------------------------------------------------------------------------------


class ServerSession(Session):
    def __init__(self, engine: ServerEngine, prompt_ids: list[int], sampling: Sampling) -> None:
        self.engine = engine
        self.ids = prompt_ids  # the committed context
        self.pending: list[int] = []  # a held-back boundary word, starting the next step
        self.sampling = sampling

    @property
    def n_tokens(self) -> int:
        return len(self.ids) + len(self.pending)

    def _room(self, extra: int) -> int:
        window = self.engine.context_window
        return max(0, window - len(self.ids) - extra - 1) if window is not None else 1 << 60

    async def extend(
        self,
        max_tokens: int,
        boundaries: Boundaries,
        stop_texts: Sequence[str] = (),
        on_text: TextCallback | None = None,
    ) -> StepOutput:
        return await self._run(max_tokens, boundaries, stop_texts, on_text, greedy=False)

    async def generate(
        self,
        max_tokens: int,
        stop_texts: Sequence[str] = (),
        on_text: TextCallback | None = None,
        close_box: bool = False,
    ) -> StepOutput:
        return await self._run(max_tokens, Boundaries((), ()), stop_texts, on_text, greedy=True, close_box=close_box)

    async def _run(
        self,
        max_tokens: int,
        boundaries: Boundaries,
        stop_texts: Sequence[str],
        on_text: TextCallback | None,
        greedy: bool,
        close_box: bool = False,
    ) -> StepOutput:
        """LocalSession's step rules on tokens streamed by the server (see the module doc)."""
        eng = self.engine
        held, self.pending = self.pending, []
        text_of = TextAssembler(eng.detokenize, held)  # the held-back word starts this step (already shown)
        word_search_from = max(1, len(text_of.text))
        sampling = Sampling(temperature=0.0, seed=self.sampling.seed) if greedy else self.sampling
        fields = eng.sampling_fields(sampling)
        stops = [*boundaries.separators, *boundaries.words, *stop_texts] + (["}"] if close_box else [])
        if eng._server_stops and stops:
            fields.update(stop=stops, **eng._server_stops)
        fields["logprobs"] = 1  # the token ids (and texts) of what is generated
        step_kind = "answer" if greedy else "step"

        streamed = eng.stream_steps
        if streamed is None:
            streamed = LIVE_TEXT.get() or eng.server_kind not in PLAIN_STEPS

        async def source(prompt: list[int], n: int) -> AsyncIterator[Chunk]:
            if streamed:
                async for chunk in eng.stream(prompt, step_kind, max_tokens=n, **fields):
                    yield chunk
            elif eng.server_kind == "llamacpp":
                native = {k: v for k, v in fields.items() if k not in ("logprobs", "stop")}
                yield await eng.complete(
                    prompt, step_kind, path="/completion", parse=parse_native, n_predict=n, stop=stops or None,
                    return_tokens=True, n_probs=1, cache_prompt=True, **native,
                )
            else:
                yield await eng.complete(prompt, step_kind, max_tokens=n, **fields)

        def commit(n: int, end: str) -> StepOutput:
            ids = text_of.ids[:n]
            self.ids += ids
            return StepOutput(ids, eng.detokenize(ids) if n < len(text_of.ids) else text_of.text, end)  # type: ignore[arg-type]

        resumes = 0
        while True:
            room = self._room(len(text_of.ids))
            remaining = min(max_tokens - len(text_of.ids), room)
            if remaining <= 0:
                return commit(len(text_of.ids), "budget")
            finish: str | None = None
            stop_reason: Any = None
            try:
                gen = source(self.ids + text_of.ids, remaining)
                try:
                    async for chunk in gen:
                        if chunk.finish_reason:
                            finish, stop_reason = chunk.finish_reason, chunk.stop_reason
                        _learn(eng, chunk.tokens)
                        for tok in _token_ids(eng, chunk):
                            if tok in eng.eos_token_ids:
                                return commit(len(text_of.ids), "eos")
                            before = len(text_of.text)
                            added = text_of.add(tok)
                            new_text = text_of.text
                            if close_box and closing_brace_index(new_text) is not None:
                                if on_text and added:
                                    on_text(added)
                                return commit(len(text_of.ids), "stop_text")
                            if any(new_text.find(s, max(0, before - len(s) + 1)) != -1 for s in stop_texts):
                                if on_text and added:
                                    on_text(added)
                                return commit(len(text_of.ids), "stop_text")
                            if boundaries.words and added:
                                at = find_word_boundary(new_text, boundaries.words, word_search_from)
                                if at is not None:
                                    keep = text_of.keep_before(at)
                                    self.pending = text_of.ids[keep:]
                                    if on_text:
                                        on_text(added)
                                    return commit(keep, "boundary")
                            if on_text and added:
                                on_text(added)
                            if added and any(
                                sep in new_text[max(0, before - len(sep) + 1) :] for sep in boundaries.separators
                            ):
                                return commit(len(text_of.ids), "boundary")
                finally:
                    await gen.aclose()  # closes the connection: the server aborts what is left
            except httpx.TransportError:
                # broken mid-stream: what arrived is kept; the next request resumes from it
                if resumes >= eng.retries:
                    raise eng._unreachable(httpx.RemoteProtocolError("dropped mid-stream")) from None
                await eng._sleep_backoff(resumes)
                resumes += 1
                continue
            if finish == "length" or finish is None:
                continue  # the budget or the window; the loop's check decides
            if finish == "stop" and isinstance(stop_reason, str):
                continue  # a server stop string that was no boundary here (e.g. "Waiting")
            return commit(len(text_of.ids), "eos")

    async def probe(self, prompt_ids: Sequence[int], max_tokens: int = 20) -> ProbeOutput:
        """Greedy, logprobs, stop at "}" (continued while inner braces are open); never changes
        the session."""
        eng = self.engine
        eng.stats.probe_requests += 1
        base = self.ids + list(prompt_ids)
        ids: list[int] = []
        lps: list[float] = []
        texts: list[str] = []
        use_stop = True
        while len(ids) < max_tokens:
            room = self._room(len(prompt_ids) + len(ids))
            if room <= 0:
                break
            fields: dict[str, Any] = {"max_tokens": min(max_tokens - len(ids), room), "temperature": 0.0, "logprobs": 1}
            if use_stop:
                fields["stop"] = ["}"]
                fields.update(eng._server_stops or {})
            chunk = await eng.complete(base + ids, "probe", **fields)
            if chunk.text and not chunk.tokens:
                raise ServerError(
                    f"the completions server at {eng.base_url} returned no logprobs, which confidence needs; "
                    "use a server that returns them (vLLM, SGLang, llama.cpp's llama-server; llama-cpp-python "
                    "needs --logits_all true)",
                    502,
                )
            _learn(eng, chunk.tokens)
            new_ids = _token_ids(eng, chunk)
            new_lps = [t.logprob if t.logprob is not None else 0.0 for t in chunk.tokens][: len(new_ids)]
            if len(new_lps) < len(new_ids):
                new_lps += [0.0] * (len(new_ids) - len(new_lps))
            closed = False
            for tok, lp in zip(new_ids, new_lps):
                if tok in eng.eos_token_ids:
                    closed = True
                    break
                ids.append(tok)
                lps.append(float(lp))
                texts.append(eng.detokenize([tok]))
                if closing_brace_index("".join(texts)) is not None:
                    closed = True
                    break
            if closed or chunk.finish_reason != "stop" or not new_ids and not use_stop:
                break
            # stopped at a "}" the server trimmed: it closed the box unless an inner brace is open
            depth = 1 + sum(t.count("{") - t.count("}") for t in texts)
            if depth <= 1:
                break
            use_stop = False  # nested: fetch the rest without stops, cut at the closing brace above
        return ProbeOutput(ids, "".join(texts), lps, len(prompt_ids))

    async def append(self, ids: Sequence[int]) -> None:
        self.pending = []  # forcing after a word boundary: the held-back word is dropped, never said
        window = self.engine.context_window
        if window is not None and len(self.ids) + len(ids) >= window:
            raise ContextTooLong(f"the context would exceed the model's window of {window} tokens")
        self.ids += list(ids)

    async def close(self) -> None:
        self.ids = []
        self.pending = []


__all__ = [
    "LIVE_TEXT",
    "ServerEngine",
    "ServerError",
    "ServerSession",
    "ServerTimeout",
    "ServerUnreachable",
    "TextAssembler",
    "parse_logprobs",
]
