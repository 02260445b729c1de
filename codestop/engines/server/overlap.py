"""Overlapped probing (``extend(run_ahead=True)``): one streamed request reads the reasoning past
every step boundary while the caller probes each boundary with requests of its own on the prefix,
which the server's prefix cache holds. Each step's own scanner finds its end in the tokens the
stream has received; a new reasoning request is needed only after a broken connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from codestop.engines.server.stopping import Stoppable
from codestop.steps import StepEnd, StepRules, StepScanner

# reads the reasoning into a scanner until it ends, calling the hook after each chunk's tokens
Reader = Callable[[StepScanner, Callable[[], None]], AsyncGenerator[str, None]]


class RunAhead:
    """A reasoning request that streams on past step ends: it was sent ``prompt`` and
    ``scanner.ids`` are the tokens received since, which the next steps take."""

    def __init__(self, rules: StepRules, prompt: list[int], scanner: StepScanner, read: Reader) -> None:
        self.rules = rules
        self.prompt = prompt
        self.scanner = scanner
        self.arrived = asyncio.Event()
        self.reader = Stoppable(self._read(read))
        self.task = self.reader.task

    async def _read(self, read: Reader) -> None:
        try:
            async with aclosing(read(self.scanner, self.arrived.set)) as texts:
                async for _ in texts:
                    pass
        finally:
            self.arrived.set()

    def token(self, i: int) -> int | None:
        """The context's ``i``-th token, None if it has not arrived yet."""
        if i < len(self.prompt):
            return self.prompt[i]
        i -= len(self.prompt)
        return self.scanner.ids[i] if i < len(self.scanner.ids) else None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.scanner.ids)

    async def follow(self, committed: int, scanner: StepScanner, eos: Callable[[], frozenset[int]]) -> AsyncGenerator[str, None]:
        """Feed ``scanner`` the stream's tokens after the ``committed`` context, waiting for more as
        needed, until the step ends. ``eos``: the EOS ids now (an EOS the stream learnt ends this
        step too)."""
        while scanner.end is None:
            at = committed + len(scanner.ids)
            if self.token(at) is not None:
                # every token that has arrived, then the text once: one piece per batch read
                scanner.eos_ids = eos()
                while scanner.end is None and (token := self.token(at)) is not None:
                    scanner.feed(token)
                    at += 1
                if piece := scanner.take_text():
                    yield piece
            elif self.task.done():
                self.task.result()  # the stream's error, if it failed
                # it ended where the tokens do not show it (an EOS the server did not list)
                kind = self.scanner.end.kind if self.scanner.end is not None else "eos"
                scanner.end = StepEnd(kind, len(scanner.ids))
            else:
                self.arrived.clear()
                await self.arrived.wait()

    async def cancel(self) -> None:
        """Stop the stream (closing it aborts the request on the server) and wait until its
        connection is back in the pool or closed; an error it ended with after that matters to no
        one. Stopped by an anyio scope, never ``Task.cancel()``, which could cut short the close of
        a stream that had just ended (see :mod:`~codestop.engines.server.stopping`)."""
        await self.reader.stopped()
