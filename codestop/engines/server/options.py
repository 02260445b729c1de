"""How the server engine talks to its server: every knob once, in one frozen dataclass checked at
construction (as vLLM's ``SamplingParams``), so no later code checks again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from codestop.engines.base import check_options
from codestop.errors import is_integer, is_number, register_secret, require

# what ServerEngine.connect takes besides the options: where, which model, whose tokenizer, wait or not
CONNECT_ARGUMENTS = ("base_url", "model", "tokenizer", "wait")


@dataclass(frozen=True)
class ServerOptions:
    """``api_key``: the server's key (``connect`` defaults it to ``$CODESTOP_UPSTREAM_API_KEY``, else
    ``$OPENAI_API_KEY``). ``concurrency``: most requests in flight per event loop; a request of a
    session that has already received tokens takes a free place before new sessions' first requests.
    ``timeout``: the longest the server may stay silent, that is, send this engine nothing on any
    request and not answer a ping (``GET /v1/models``) either; past it a request fails with
    :class:`~codestop.errors.ServerTimeout` (504). Time a request spends queued behind other requests,
    in a long prefill or generating a plain answer is no silence while the server shows life; it is
    bounded by ``queue_timeout`` (None: not at all), the longest one request may wait for a byte of
    its own or for a place in the limit, past which it fails with :class:`~codestop.errors.ServerBusy`
    (503 with ``Retry-After``). ``connect_timeout`` apart. ``retries``: how often a request that fails (429, 5xx, a dropped
    connection) or makes no progress is sent again, ``backoff`` seconds apart at first, doubling.
    ``stream_steps``: None streams a step when its text is shown live, when the server cannot end a
    plain request at a boundary, or when its stop strings exceed ``max_stops``; True or False forces
    it. ``max_stops``: most stop strings one request carries (None: the dialect's cap, 4 as vLLM and
    the OpenAI API accept).
    ``transport``: an httpx transport for every client the engine makes (tests:
    ``httpx.MockTransport``)."""

    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 64
    timeout: float = 60.0
    queue_timeout: float | None = 600.0
    connect_timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5
    stream_steps: bool | None = None
    max_stops: int | None = None
    transport: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        require(self.api_key is None or isinstance(self.api_key, str), "api_key", "[redacted]", "must be a string")
        register_secret(self.api_key)  # an upstream that echoes its key in an error never relays it
        require(is_integer(self.concurrency) and self.concurrency >= 1, "concurrency", self.concurrency, "must be an integer >= 1")
        require(is_number(self.timeout) and self.timeout > 0, "timeout", self.timeout, "must be > 0 seconds")
        require(self.queue_timeout is None or is_number(self.queue_timeout) and self.queue_timeout > 0, "queue_timeout",
                self.queue_timeout, "must be > 0 seconds, or None for no limit")
        require(is_number(self.connect_timeout) and self.connect_timeout > 0, "connect_timeout", self.connect_timeout,
                "must be > 0 seconds")
        require(is_integer(self.retries) and self.retries >= 0, "retries", self.retries, "must be an integer >= 0")
        require(is_number(self.backoff) and self.backoff >= 0, "backoff", self.backoff, "must be >= 0 seconds")
        require(self.stream_steps in (None, True, False), "stream_steps", self.stream_steps, "must be None, True or False")
        require(self.max_stops is None or is_integer(self.max_stops) and self.max_stops >= 1, "max_stops", self.max_stops,
                "must be an integer >= 1 (vLLM and OpenAI accept 4)")

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> ServerOptions:
        """The options named in ``options``; any other name is an error naming it (and the closest
        known one), never dropped."""
        check_options("server", options, [*CONNECT_ARGUMENTS, *cls.names()])
        return cls(**options)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
