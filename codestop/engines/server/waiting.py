"""Waiting for a completions server without mistaking a busy one for a dead one (the
:mod:`~codestop.engines.server.transport` docstring says the rules): :class:`Limit`, the proxy's
own concurrency limit, started sessions first; :class:`Heed`, one request's waits for its server's
next byte, ended by the server's silence (``timeout``) or this request's patience
(``queue_timeout``)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from typing import Protocol, TypeVar

from codestop.engines.server.options import ServerOptions
from codestop.errors import ServerBusy, ServerError, ServerTimeout

BUSY_RETRY_AFTER_S = 10  # the Retry-After the proxy suggests when the server named none
PING = "/v1/models"  # every OpenAI-compatible server answers it, outside its generation queue
T = TypeVar("T")


class Watched(Protocol):
    """What :class:`Heed` reads of its transport (:class:`~codestop.engines.server.transport.Transport`)."""

    base_url: str
    options: ServerOptions
    heard: float  # when the server last showed life (time.monotonic)

    def ping(self) -> None: ...


class Limit:
    """The most requests in flight on one event loop. A place that frees goes first to a request of
    a session that has already received tokens (its client is reading a stream, and only an error
    event could end it now), then to new sessions' first requests, which can still be turned away
    with a status: a wait past ``patience`` seconds is a :class:`ServerBusy` (503)."""

    def __init__(self, n: int, patience: float | None) -> None:
        self.size = self.free = n
        self.patience = patience
        self.queues: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())

    @asynccontextmanager
    async def hold(self, started: bool) -> AsyncIterator[None]:
        await self.acquire(started)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, started: bool) -> None:
        if self.free > 0 and not self.queues[0] and not self.queues[1]:
            self.free -= 1
            return
        queue = self.queues[0 if started else 1]
        waiter = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            async with asyncio.timeout(self.patience):
                await waiter
        except BaseException as err:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a place as it gave up: pass it on
            else:
                with suppress(ValueError):
                    queue.remove(waiter)
            if isinstance(err, TimeoutError):
                raise ServerBusy(f"the proxy is busy: all {self.size} of its places for upstream requests stayed taken "
                                 f"for {self.patience:g} s (--concurrency, --queue-timeout); retry later", 503,
                                 BUSY_RETRY_AFTER_S) from None
            raise

    def release(self) -> None:
        for queue in self.queues:
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.free += 1


class Heed:
    """One request's waits for its server's next byte (see the module docstring): ``await
    heed(read)`` returns what ``read`` gives, or raises :class:`ServerTimeout` once the server has
    been silent for ``timeout`` (nothing on any request, no answer to a ping), or
    :class:`ServerBusy` once this request has had no byte of its own for ``queue_timeout``. The
    clock watches the wait itself only: time the caller spends between reads is not the server's."""

    def __init__(self, transport: Watched) -> None:
        self.transport = transport
        self.last = time.monotonic()  # when the current wait began
        self.why: ServerError | None = None
        self._timer: asyncio.Timeout | None = None
        self._check: asyncio.TimerHandle | None = None

    async def __call__(self, read: Awaitable[T]) -> T:
        loop = asyncio.get_running_loop()
        self.last = time.monotonic()
        try:
            async with asyncio.timeout(None) as self._timer:
                self._schedule(loop)
                try:
                    value = await read
                finally:
                    if self._check is not None:
                        self._check.cancel()
        except TimeoutError:
            if self.why is None:
                raise
            raise self.why from None
        self.last = self.transport.heard = time.monotonic()
        return value

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Check again when the quiet reaches half the timeout (ping), the timeout, or the patience."""
        t = self.transport
        quiet = max(t.heard, self.last)
        now = time.monotonic()
        at = quiet + (t.options.timeout / 2 if now - quiet < t.options.timeout / 2 else t.options.timeout)
        if t.options.queue_timeout is not None:
            at = min(at, self.last + t.options.queue_timeout)
        self._check = loop.call_later(max(0.0, at - now), self._on_check, loop)

    def _on_check(self, loop: asyncio.AbstractEventLoop) -> None:
        t = self.transport
        now = time.monotonic()
        quiet = now - max(t.heard, self.last)
        waited = now - self.last
        if t.options.queue_timeout is not None and waited >= t.options.queue_timeout:
            self.why = ServerBusy(
                f"the completions server at {t.base_url} shows life (bytes on other requests, or an answer to a ping of "
                f"{PING}) but sent this request nothing for {waited:.0f} s: queued behind others, or its generation is "
                f"hung (--queue-timeout {t.options.queue_timeout:g}); retry later", 503, BUSY_RETRY_AFTER_S)
        elif quiet >= t.options.timeout:
            self.why = ServerTimeout(
                f"the completions server at {t.base_url} stayed silent for {t.options.timeout:g} s (no byte on any "
                f"request, no answer to a ping of {PING}); it may be overloaded or hung")
        else:
            if quiet >= t.options.timeout / 2:
                t.ping()
            self._schedule(loop)
            return
        assert self._timer is not None
        self._timer.reschedule(loop.time())
