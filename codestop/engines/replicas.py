"""Several replicas of one model behind one engine (``--base-url`` given more than once).

Each question stays on one replica: :meth:`ReplicaEngine.start` picks the healthy replica with
the fewest sessions in flight (ties: the first) and every request of that session (steps, probes,
the answer) goes there, so its growing prefix is prefilled once and then read from that replica's
prefix cache. Spreading a session's requests over replicas would prefill the prefix again on each.
An agent's answer phase (:meth:`ReplicaEngine.chat`, one request to a chat endpoint) goes to the
healthy replica with the fewest requests in flight.

A replica that fails (unreachable, a timeout, a 5xx) is taken out of rotation for new sessions;
the sessions it was running fail with their usual error. It is health-checked again at most every
``recheck_s`` seconds, from :meth:`~ReplicaEngine.start`, :meth:`~ReplicaEngine.ready` and
:meth:`~ReplicaEngine.health` (in the background while another replica serves, inline when none
does), and rejoins once the check passes. Tokenizer, template and model info come from the first
healthy replica: they all serve the same model, which connecting checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from codestop.engines.base import CounterKey, Engine, ProbeOutput, Session, StepOutput
from codestop.engines.server import Dialect, HFTokens, RemoteTokens, ServerEngine
from codestop.errors import CodestopError, ServerError, ServerTimeout, ServerUnreachable
from codestop.sampling import Sampling
from codestop.steps import StepRules

RECHECK_S = 3.0  # least time between two health checks of a replica out of rotation

T = TypeVar("T")
Labels = tuple[tuple[str, str], ...]  # a counter's labels, as serve.py's /metrics reads them

__all__ = ["ReplicaEngine", "ReplicaSession"]


def fails_replica(err: BaseException) -> bool:
    """Whether ``err`` says the replica itself is down (not the request at fault): unreachable, or
    a 5xx from the server itself (a 4xx it answered, e.g. a bad request, is the request's fault)."""
    if isinstance(err, ServerUnreachable):
        return True
    if not isinstance(err, ServerError):
        return False
    return (err.upstream_status if err.upstream_status is not None else err.status) >= 500


@dataclass(eq=False)
class Replica:
    """One upstream and what the engine knows of it."""

    engine: ServerEngine
    down: bool = False  # failed: out of rotation until a health check passes
    in_flight: int = 0
    sessions: int = 0  # sessions started here
    failures: int = 0  # times taken out of rotation
    error: str = ""  # the last error seen
    checked: float = -float("inf")  # when it was last health-checked (monotonic)
    checking: bool = False

    @property
    def url(self) -> str:
        return self.engine.base_url

    @property
    def healthy(self) -> bool:
        return self.engine.connected and not self.down


class ReplicaEngine(Engine):
    """N :class:`ServerEngine` replicas of one model as one engine. Build it with :meth:`connect`."""

    name = "server"

    def __init__(self, replicas: Sequence[ServerEngine], *, recheck_s: float = RECHECK_S) -> None:
        if len(replicas) < 2:
            raise ValueError(f"replicas: {len(replicas)} given; a ReplicaEngine needs at least 2 (one is a ServerEngine)")
        self.replicas = [Replica(e) for e in replicas]
        self.recheck_s = recheck_s
        self._checks: set[asyncio.Task[Any]] = set()  # background health checks (kept referenced)
        self._pieces: dict[int, bytes] = {}  # token bytes shared by every replica's remote tokenizer
        self.model_name = replicas[0].model_name  # the model asked for, until one is reached
        self._agreed: tuple[str, str] | None = None  # (model, url): the first replica reached serves it
        for r in self.replicas:
            if r.engine.connected:
                if (why := self._mismatch(r)) is not None:
                    raise CodestopError(why)
                self._joined(r)

    @classmethod
    def connect(cls, base_urls: Sequence[str], *, wait: bool = True, tokenizer: Any = None,
                recheck_s: float = RECHECK_S, **options: Any) -> ReplicaEngine:
        """Connect to every replica (options as :meth:`ServerEngine.connect`). ``wait``: at least
        one must answer now (the others join when they do); ``wait=False``: none need to yet."""
        roots = [str(u).rstrip("/").removesuffix("/v1") for u in base_urls]
        twice = sorted({u for u in roots if roots.count(u) > 1})
        if twice:
            raise CodestopError(f"base_url: {', '.join(twice)} given more than once; give each replica once")
        if isinstance(tokenizer, str):
            tokenizer = HFTokens.load(tokenizer)  # loaded once for all
        engines: list[ServerEngine] = []
        errors: dict[int, str] = {}
        try:
            for i, url in enumerate(base_urls):
                try:
                    engines.append(ServerEngine.connect(url, wait=wait, tokenizer=tokenizer, **options))
                except (ServerUnreachable, ServerTimeout) as err:  # down now: it joins when it answers
                    errors[i] = str(err)
                    engines.append(ServerEngine.connect(url, wait=False, tokenizer=tokenizer, **options))
            if wait and len(errors) == len(engines):
                raise ServerUnreachable(f"base_url: none of the {len(engines)} replicas can be reached: " + "; ".join(errors.values()))
            engine = cls(engines, recheck_s=recheck_s)
        except BaseException:
            for e in engines:
                e.close()
            raise
        for i, why in errors.items():
            engine.replicas[i].error, engine.replicas[i].checked = why, time.monotonic()
        return engine

    # -- rotation --------------------------------------------------------------------------------
    def _mismatch(self, r: Replica) -> str | None:
        """Why a connected replica cannot serve with the others: another model (or name)."""
        if self._agreed is None or r.engine.model_name == self._agreed[0]:
            return None
        return (f"model: {r.url} serves {r.engine.model_name!r} but {self._agreed[1]} serves {self._agreed[0]!r}; "
                "every --base-url must serve the same model under the same name (vLLM --served-model-name, llama.cpp --alias)")

    def _joined(self, r: Replica) -> None:
        """Take in a connected replica: its model, its window (the smallest wins), its remote
        tokenizer's known token bytes (shared by all: the same model)."""
        if self._agreed is None:
            self._agreed = (r.engine.model_name, r.url)
        self.model_name = self._agreed[0]
        windows = [o.engine.context_window for o in self.replicas if o.engine.connected and o.engine.context_window]
        self.context_window = min(windows) if windows else None
        if isinstance(r.engine.tokens, RemoteTokens) and r.engine.tokens.pieces is not self._pieces:
            self._pieces.update(r.engine.tokens.pieces)
            r.engine.tokens.pieces = self._pieces

    def _down(self, r: Replica, why: str) -> None:
        if not r.down:
            r.failures += 1
        r.down, r.error = True, why

    def _failed(self, r: Replica, err: BaseException) -> None:
        """A request failed on ``r``: out of rotation if the replica is at fault."""
        if fails_replica(err):
            self._down(r, str(err))
            r.checked = time.monotonic()

    async def _check(self, r: Replica) -> dict[str, Any]:
        """One health check: back in rotation when it passes, out when it does not."""
        r.checking, r.checked = True, time.monotonic()
        try:
            state = await r.engine.health()
        finally:
            r.checking = False
        why = self._mismatch(r) if state.get("ok") else str(state.get("error") or state.get("upstream") or "unhealthy")
        if why is None:
            r.down = False
            self._joined(r)
        else:
            self._down(r, why)
        return state

    async def _recheck(self) -> None:
        """Health-check the replicas out of rotation whose last check is old enough: inline when
        none is healthy (the caller waits for the answer), else in the background."""
        now = time.monotonic()
        due = [r for r in self.replicas if not r.healthy and not r.checking and now - r.checked >= self.recheck_s]
        if not due:
            return
        if not any(r.healthy for r in self.replicas):
            await asyncio.gather(*(self._check(r) for r in due))
            return
        for r in due:
            task = asyncio.create_task(self._check(r))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    def _unavailable(self) -> ServerError:
        why = "; ".join(f"{r.url}: {r.error or 'not reached yet'}" for r in self.replicas)
        return ServerError(f"none of the {len(self.replicas)} completions servers is available ({why}); retry shortly", 503)

    def _order(self) -> list[Replica]:
        """Connected replicas, healthy first: who answers tokenizer and template calls."""
        connected = [r for r in self.replicas if r.engine.connected]
        if not connected:
            raise self._unavailable()
        return sorted(connected, key=lambda r: not r.healthy)

    def _first(self, call: Callable[[ServerEngine], T]) -> T:
        """``call`` on the first replica that answers it; one that fails is taken out of rotation."""
        *others, last = self._order()
        for r in others:
            try:
                return call(r.engine)
            except ServerError as err:
                if not fails_replica(err):
                    raise
                self._failed(r, err)
        return call(last.engine)

    # -- the engine interface ----------------------------------------------------------------------
    async def ready(self) -> None:
        await self._recheck()
        if not any(r.healthy for r in self.replicas):
            raise self._unavailable()

    async def start(self, prompt_ids: Sequence[int], sampling: Sampling, *, live: bool = False) -> ReplicaSession:
        await self.ready()
        self.check_prompt(prompt_ids)
        while True:
            r = self._least_busy()
            r.in_flight += 1  # before any await: concurrent starts see it
            try:
                inner = await r.engine.start(prompt_ids, sampling, live=live)
            except ServerError as err:
                r.in_flight -= 1
                if not fails_replica(err):
                    raise
                self._failed(r, err)
                continue
            except BaseException:
                r.in_flight -= 1
                raise
            r.sessions += 1
            return ReplicaSession(inner, self, r)

    def _least_busy(self) -> Replica:
        """The healthy replica with the fewest requests in flight (ties: the first)."""
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            raise self._unavailable()
        return min(healthy, key=lambda r: r.in_flight)  # min keeps the first of equals

    async def chat(self, messages: list[dict[str, Any]], prefix: str, fields: dict[str, Any], sampling: Sampling, *,
                   stream: bool, started: bool = False) -> AsyncGenerator[dict[str, Any], None]:
        """One chat request (:meth:`ServerEngine.chat`) on the healthy replica with the fewest
        requests in flight; one that fails before its first payload is taken out of rotation and
        the next one asked, as :meth:`start` does."""
        await self.ready()
        while True:
            r = self._least_busy()
            r.in_flight += 1
            answered = False
            try:
                async with aclosing(r.engine.chat(messages, prefix, fields, sampling, stream=stream, started=started)) as payloads:
                    async for payload in payloads:
                        answered = True
                        yield payload
                return
            except ServerError as err:
                self._failed(r, err)
                if answered or not fails_replica(err):
                    raise
            finally:
                r.in_flight -= 1

    async def health(self) -> dict[str, Any]:
        """Every replica checked now: ``replicas`` lists url, healthy, in_flight, sessions and the
        last error; ``ok`` while one can serve; ``upstream`` "ok" (all), "partial", "starting" (none
        reached yet) or "unreachable"."""
        states = await asyncio.gather(*(self._check(r) for r in self.replicas))
        healthy = sum(r.healthy for r in self.replicas)
        if healthy == len(self.replicas):
            upstream = "ok"
        elif healthy:
            upstream = "partial"
        else:
            upstream = "unreachable" if any(r.engine.connected for r in self.replicas) else "starting"
        models: list[str] = next((s["models"] for s in states if s.get("ok") and s.get("models")), [])
        return {
            "ok": bool(healthy), "upstream": upstream, "model": self.model_name, "models": models,
            "replicas": [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight, "sessions": r.sessions,
                          "last_error": r.error or None} for r in self.replicas],
        }

    def connections(self) -> dict[str, int]:
        """The upstream connections in use and idle, every replica's together."""
        out = {"in_use": 0, "idle": 0}
        for r in self.replicas:
            for state, n in r.engine.connections().items():
                out[state] = out.get(state, 0) + n
        return out

    def counters(self) -> dict[str, dict[CounterKey, float]]:
        """Every replica's counters with a ``replica`` label (the URL) beside ``kind``, plus the
        sessions started on each and the times each was taken out of rotation."""
        out: dict[str, dict[CounterKey, float]] = {"replica_sessions": {}, "replica_failures": {}}
        for r in self.replicas:
            where = ("replica", r.url)
            for name, by_kind in r.engine.counters().items():
                for kind, n in by_kind.items():
                    labels = kind if isinstance(kind, tuple) else ((("kind", kind),) if kind else ())
                    key: Labels = (*labels, where)
                    out.setdefault(name, {})[key] = n
            out["replica_sessions"][(where,)] = r.sessions
            out["replica_failures"][(where,)] = r.failures
        return out

    async def aclose(self) -> None:
        for task in list(self._checks):
            if task.get_loop() is asyncio.get_running_loop():
                task.cancel()
        await asyncio.gather(*(r.engine.aclose() for r in self.replicas))

    def close(self) -> None:
        """Close every replica's sync client (sync callers; :meth:`aclose` closes everything)."""
        for r in self.replicas:
            r.engine.close()

    # -- tokenizer and model: any healthy replica (the same model) -----------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._first(lambda e: e.tokenize(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._first(lambda e: e.detokenize(ids))

    def chat_template(self, messages: list[dict[str, str]], **template_kwargs: Any) -> str:
        return self._first(lambda e: e.chat_template(messages, **template_kwargs))

    async def run_tokenizer(self, fn: Callable[..., Any], *args: Any) -> Any:
        await self.ready()
        if isinstance(self._order()[0].engine.tokens, RemoteTokens):  # blocking HTTP: off the event loop
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        # the union: a vLLM replica learns its EOS from its own first completion
        return frozenset().union(*(r.engine.eos_token_ids for r in self.replicas if r.engine.connected))

    @property
    def bos_token_id(self) -> int | None:
        return self.replicas[0].engine.bos_token_id

    def model_info(self) -> dict[str, Any]:
        return self._order()[0].engine.model_info()

    @property
    def dialect(self) -> Dialect:
        """The first healthy replica's server kind (the replicas serve one model, on one kind)."""
        return self._order()[0].engine.dialect

    def default_sampling(self) -> Sampling:
        return self.replicas[0].engine.default_sampling()


class ReplicaSession(Session):
    """A replica's session: every call goes to it; a replica failure takes the replica out of
    rotation (and is raised as is); closing it frees its place in the replica's in-flight count."""

    def __init__(self, inner: Session, owner: ReplicaEngine, replica: Replica) -> None:
        self.inner, self.owner, self.replica = inner, owner, replica
        self._open = True

    def __getattr__(self, name: str) -> Any:  # anything else the replica's session offers
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def n_tokens(self) -> int:
        return self.inner.n_tokens

    @property
    def overrun(self) -> int:
        return self.inner.overrun

    @overrun.setter
    def overrun(self, value: int) -> None:
        self.inner.overrun = value

    async def _watch(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except ServerError as err:
            self.owner._failed(self.replica, err)
            raise

    async def extend(self, max_tokens: int, rules: StepRules, *, run_ahead: bool = False) -> AsyncGenerator[str | StepOutput, None]:
        try:
            async with aclosing(self.inner.extend(max_tokens, rules, run_ahead=run_ahead)) as items:
                async for item in items:
                    yield item
        except ServerError as err:
            self.owner._failed(self.replica, err)
            raise

    async def probe(self, prompt_ids: Sequence[int], max_tokens: int = 20) -> ProbeOutput:
        return await self._watch(self.inner.probe(prompt_ids, max_tokens))

    async def append(self, ids: Sequence[int]) -> None:
        await self._watch(self.inner.append(ids))

    async def rollback(self, n_tokens: int) -> None:
        await self._watch(self.inner.rollback(n_tokens))

    async def halt(self) -> None:
        await self._watch(self.inner.halt())

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            if self._open:
                self._open = False
                self.replica.in_flight -= 1
