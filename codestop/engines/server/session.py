"""A question on a completions server: its context as token ids, sent whole with every request.

One request per reasoning step and one per probe; the server's prefix cache does the reuse, so a
probe costs about its own tokens. Every token id the server returns is fed to the one
:class:`~codestop.steps.StepScanner`, which decides where a step ends exactly as it does for the
in-process engines. A stop string that is no boundary here ("Wait" inside "Waiting") just continues
the step with another request, and tokens a plain request returns after the end of the step are not
kept. A streamed step is closed where the scanner ends it, which aborts the request on the server.
A step broken mid-stream resumes from the tokens already received; a request that makes no progress
is re-sent at most ``retries`` times.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Protocol

import httpx

from codestop.engines.base import ProbeOutput, Session, StepOutput
from codestop.engines.server.dialects import Dialect
from codestop.engines.server.options import ServerOptions
from codestop.engines.server.overlap import RunAhead
from codestop.engines.server.transport import Chunk, Transport
from codestop.errors import ContextTooLong, ServerError
from codestop.sampling import Sampling
from codestop.steps import StepEnd, StepRules, StepScanner

PROBE_RULES = StepRules(close_box=True, greedy=True)
# a request for the tokens after ``ids`` (those already received), at most ``n`` of them
Requester = Callable[[list[int], int], AsyncGenerator[Chunk, None]]


class SessionEngine(Protocol):
    """What a session asks of its engine (:class:`~codestop.engines.server.ServerEngine`, which
    imports this module to start sessions)."""

    base_url: str
    options: ServerOptions
    transport: Transport
    dialect: Dialect
    context_window: int | None

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def learn_eos(self, token_id: int) -> None: ...

    async def ensure_decodable(self, ids: Sequence[int]) -> None: ...

    async def chunk_ids(self, chunk: Chunk) -> list[int]: ...

    def stops_for(self, rules: StepRules) -> tuple[list[str], bool]: ...

    def step_chunks(self, prompt_ids: Sequence[int], max_tokens: int, rules: StepRules, sampling: Sampling,
                    streamed: bool, started: bool = False) -> AsyncGenerator[Chunk, None]: ...

    def probe_chunks(self, prompt_ids: Sequence[int], max_tokens: int, slot: bool = True,
                     started: bool = False) -> AsyncGenerator[Chunk, None]: ...


class ServerSession(Session):
    """One question's committed context as token ids (``ids``) and a held-back boundary word
    (``pending``) that starts the next step.

    Overlapped probing (``extend(run_ahead=True)``, :mod:`~codestop.engines.server.overlap`): one
    streamed request reads the reasoning on; anything else the session is asked (an answer, an
    append, a rollback, ``halt``) cancels it first and counts the tokens it had received past the
    committed context as ``overrun``."""

    def __init__(self, engine: SessionEngine, prompt_ids: list[int], sampling: Sampling, live: bool = False) -> None:
        self.engine = engine
        self.ids = prompt_ids
        self.pending: list[int] = []
        self.sampling = sampling
        self.live = live
        self.overrun = 0
        self.started = False  # tokens received: its next requests go before new sessions' (waiting.Limit)
        self._ahead: RunAhead | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.ids) + len(self.pending)

    def streamed(self, rules: StepRules) -> bool:
        """Whether a step by ``rules`` is streamed: when its text is shown live, when the server
        cannot end a plain request at a boundary, when its stop strings do not all fit in one
        request (the scanner then finds the rest client-side), or when it has no boundaries to end
        it early (a policy that never probes, a free answer): such a request runs to the end of the
        reasoning or answer, and a plain one would be silent for all of it, while a stream's
        tokens show the server at work (``timeout`` is silence, not a generation's length)."""
        eng = self.engine
        if eng.options.stream_steps is not None:
            return eng.options.stream_steps
        long = not (rules.separators or rules.words or rules.close_box)
        return self.live or long or not eng.dialect.plain_steps or not eng.stops_for(rules)[1]

    def _room(self, context: int) -> int:
        """Tokens a request may generate after ``context`` tokens of prompt (the server's limit)."""
        window = self.engine.context_window
        return window - context if window is not None else 1 << 60

    async def _scan(self, scanner: StepScanner, request: Requester, logprobs: list[float] | None = None,
                    on_feed: Callable[[], None] | None = None) -> AsyncGenerator[str, None]:
        """Feed every token the server generates to ``scanner`` until it ends the step, yielding the
        text it hands out. Requests continue after the tokens received: past a stop string that is
        no boundary here ("Waiting"), the server's own length limit, or a connection broken
        mid-stream; ``retries`` times at most without progress. A ``length`` finish that brought no
        token ends the step there (``length``). ``logprobs`` collects the tokens';
        ``on_feed`` is called after each chunk's tokens are fed."""
        eng = self.engine
        transport = eng.transport
        idle = resumes = 0
        while scanner.end is None:
            fed = len(scanner.ids)
            finish: str | None = None
            stop: str | int | None = None
            try:
                async with aclosing(request(scanner.ids, scanner.max_tokens - fed)) as chunks:
                    async for chunk in chunks:
                        ids = await eng.chunk_ids(chunk)
                        if logprobs is not None:
                            if chunk.logprobs is None and ids:
                                raise ServerError(
                                    f"the completions server at {eng.base_url} returned no logprobs, which confidence "
                                    "needs; use a server that returns them (vLLM, SGLang, llama.cpp's llama-server; "
                                    "llama-cpp-python needs --logits_all true)"
                                )
                            lps = [float(lp or 0.0) for lp in chunk.logprobs or []]
                            logprobs += (lps + [0.0] * len(ids))[: len(ids)]
                        if (eos := eng.dialect.listed_eos(chunk, ids)) is not None:
                            eng.learn_eos(eos)  # before the scanner sees it, so its text is never kept
                            scanner.eos_ids = eng.eos_token_ids
                        self.started = self.started or bool(ids)
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
                raise transport.unreachable(err) from None
            except httpx.TransportError as err:  # broken mid-stream: the next request resumes after what arrived
                if resumes >= eng.options.retries:
                    raise transport.unreachable(err) from None
                await transport.backoff(resumes)
                resumes += 1
                continue
            if scanner.end is not None:
                break
            if finish == "stop" and not isinstance(stop, str):
                scanner.end = StepEnd("eos", len(scanner.ids))  # an EOS (or stop token) the server did not list
            elif finish == "length" and len(scanner.ids) == fed:
                # the server's budget ended with nothing to show: an answer, not a failure (llama.cpp
                # withholds the tokens of an unfinished UTF-8 character, and the count ends inside one)
                scanner.end = StepEnd("length", len(scanner.ids))
            elif len(scanner.ids) > fed:
                idle = 0
            elif idle < eng.options.retries:
                await transport.backoff(idle)
                idle += 1
            else:
                raise ServerError(
                    f"the completions server at {eng.base_url} returned no new tokens {idle + 1} times in a row "
                    f"(finish reason {finish!r}); it may be capping the request (its own context or max-tokens limit)"
                )

    async def extend(self, max_tokens: int, rules: StepRules, *, run_ahead: bool = False) -> AsyncGenerator[str | StepOutput, None]:
        eng = self.engine
        ahead = self._ahead if run_ahead and self._ahead is not None and self._ahead.rules == rules else None
        if ahead is None:
            await self.halt()
        held, self.pending = self.pending, []
        await eng.ensure_decodable(held)
        room = self._room(len(self.ids) + 1)  # as in-process: the committed context and one token spare
        scanner = StepScanner(eng.detokenize, rules, eng.eos_token_ids, max(1, min(max_tokens, room)), held)
        sampling = self.sampling.greedy() if rules.greedy else self.sampling
        if run_ahead:
            if ahead is None:
                ahead = self._ahead = self._run_ahead(rules, sampling, self.ids + held, scanner.max_tokens - len(held))
            pieces = ahead.follow(len(self.ids), scanner, lambda: eng.eos_token_ids)
        else:
            streamed = self.streamed(rules)

            def request(ids: list[int], n: int) -> AsyncGenerator[Chunk, None]:
                return eng.step_chunks(self.ids + ids, n, rules, sampling, streamed, self.started)

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

    def _run_ahead(self, rules: StepRules, sampling: Sampling, prompt: list[int], max_tokens: int) -> RunAhead:
        """Start one streamed request for the rest of the reasoning: it ends only where the
        reasoning does (stop texts, client stops, EOS, ``max_tokens``); the boundaries are found
        client-side by each step's own scanner."""
        eng = self.engine
        to_end = replace(rules, separators=(), words=())

        def request(ids: list[int], n: int) -> AsyncGenerator[Chunk, None]:
            return eng.step_chunks(prompt + ids, n, to_end, sampling, streamed=True, started=self.started)

        scanner = StepScanner(eng.detokenize, to_end, eng.eos_token_ids, max(1, max_tokens))
        return RunAhead(rules, prompt, scanner, lambda sc, on_feed: self._scan(sc, request, on_feed=on_feed))

    async def halt(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        await ahead.cancel()
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
        async with aclosing(self._scan(scanner, lambda ids, n: eng.probe_chunks(base + ids, n, slot, self.started), lps)) as pieces:
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
