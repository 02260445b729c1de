"""Stopping work that may hold upstream connections without leaking them.

httpx's pool (httpcore) closes a response under an anyio *shielded* cancel scope, which holds off
anyio's cancellation but not asyncio's ``Task.cancel()``. A ``Task.cancel()`` that reaches a task
while it is closing a response (it has just read the end of a stream, or of a probe's answer) is
raised at the first await inside that close, after httpcore has marked the response closed and
before the pool has taken its connection back: the connection stays checked out for good, its
socket sits in CLOSE-WAIT once the server hangs up, and after ``concurrency`` such stops every
request waits for a connection until it times out (encode/httpcore#1115, encode/httpx#3782).

So work that may hold a connection is stopped with an anyio cancel scope (:class:`Stoppable`),
whose cancellation is delivered only outside shielded scopes: httpcore's closes always complete,
and every await outside them is cancelled (a read, a wait for a connection, a backoff). And a
response codestop closes itself is closed in a task of its own (:func:`close_response`), which no
cancellation of the caller reaches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Generic, TypeVar

import anyio
import httpx

T = TypeVar("T")
_closing: set[asyncio.Task[None]] = set()  # closes still running after their caller was cancelled


class Stoppable(Generic[T]):
    """``work`` run in a task of its own (``task``) that :meth:`stop` ends by cancelling an anyio
    scope around it, never by ``Task.cancel()``; a stopped task's result is None."""

    def __init__(self, work: Awaitable[T]) -> None:
        self.scope = anyio.CancelScope()
        self.task: asyncio.Task[T | None] = asyncio.ensure_future(self._run(work))

    async def _run(self, work: Awaitable[T]) -> T | None:
        with self.scope:  # a stop before the task starts is delivered at its first await
            return await work
        return None  # stopped: the scope swallowed its own cancellation

    def stop(self) -> None:
        self.scope.cancel()

    async def stopped(self) -> None:
        """Stop it and wait until it has ended (its closes done); an error it ended with is left
        in ``task``, retrieved so that asyncio does not log it."""
        self.stop()
        await asyncio.wait([self.task])
        if not self.task.cancelled():
            self.task.exception()


async def close_response(response: httpx.Response) -> None:
    """Close ``response`` (the connection back to the pool, or closed) in a task of its own: a
    cancellation of the caller, asyncio's or anyio's, ends the wait but never the close."""
    closing = asyncio.ensure_future(response.aclose())
    _closing.add(closing)
    closing.add_done_callback(_closed)
    await asyncio.shield(closing)


def _closed(task: asyncio.Task[None]) -> None:
    _closing.discard(task)
    if not task.cancelled():
        task.exception()  # a close that failed after its caller left: nothing to tell, nothing to log
