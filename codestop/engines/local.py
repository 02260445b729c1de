"""In-process sessions, shared by the transformers and llama.cpp engines: sampling in numpy on four
primitives of a context (feed tokens, crop it, read the last logits, count its tokens), each token
fed to the one step scanner of :mod:`codestop.steps`.

Blocking work runs in a worker thread under one lock per engine, a few tokens at a time
(``LOCAL_CHUNK_TOKENS``), so a long step never holds the model for long, other sessions
interleave, and a cancelled request stops between chunks.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from codestop.engines.base import Engine, ProbeOutput, Session, StepOutput
from codestop.errors import CodestopError, ContextTooLong
from codestop.sampling import Sampling
from codestop.steps import StepRules, StepScanner

LOCAL_CHUNK_TOKENS = 4  # tokens per locked worker-thread call: the latency of a cancel, the grain of interleaving


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Temperature / top-k / top-p sampling in numpy (greedy when temperature is 0 or None)."""
    t = sampling.temperature
    if not t:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / t
    k = sampling.top_k
    if k and 0 < k < x.shape[0]:
        idx = np.argpartition(x, -k)[-k:]
    else:
        idx = np.arange(x.shape[0])
    vals = x[idx]
    order = np.argsort(-vals)
    idx, vals = idx[order], vals[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    p = sampling.top_p
    if p is not None and p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), p) + 1)
        idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
    return int(idx[rng.choice(len(idx), p=probs)])


class LocalBackend(abc.ABC):
    """The primitives of one in-process context (a KV cache and the logits after its last token)."""

    @property
    @abc.abstractmethod
    def n_tokens(self) -> int: ...

    @abc.abstractmethod
    def feed(self, ids: Sequence[int]) -> None:
        """Run ``ids`` through the model after the current context; the last logits become those
        after ``ids[-1]``."""

    @abc.abstractmethod
    def crop(self, n_tokens: int) -> None:
        """Cut the context back to its first ``n_tokens`` tokens (KV rollback). ``logits()`` then
        still returns the last logits computed (stale) until ``set_logits`` or ``feed``: the session
        never samples from them (a probe restores them, a held-back word is fed first)."""

    @abc.abstractmethod
    def logits(self) -> np.ndarray:
        """The next-token logits (1-D float array over the vocabulary)."""

    @abc.abstractmethod
    def set_logits(self, logits: np.ndarray) -> None:
        """Restore saved next-token logits (after a crop back to where they were read)."""

    @property
    def can_crop(self) -> bool:
        """False where crop is not exact (then probes snapshot and restore instead)."""
        return True

    def snapshot(self) -> Any:
        """A restorable state; by default the context length and a copy of the logits."""
        return (self.n_tokens, np.array(self.logits(), copy=True))

    def restore(self, snap: Any) -> None:
        n, logits = snap
        self.crop(n)
        self.set_logits(logits)

    def close(self) -> None:  # noqa: B027 - optional
        """Release the context (the session calls it under the engine's lock)."""


class LocalEngine(Engine):
    """Base for in-process engines: subclasses provide tokenizer methods and ``new_backend``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abc.abstractmethod
    def new_backend(self, prompt_ids: Sequence[int]) -> LocalBackend:
        """A fresh context holding ``prompt_ids`` (already fed)."""

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def start(self, prompt_ids: Sequence[int], sampling: Sampling, *, live: bool = False) -> LocalSession:
        self.check_prompt(prompt_ids)
        # A start stopped while its thread feeds the prompt (a client gone) cannot stop the thread:
        # the context it makes is released once made, by the thread itself or here, never leaked.
        handoff = threading.Lock()
        made: list[LocalBackend] = []
        abandoned = False

        def open_backend() -> LocalBackend | None:
            backend = self.new_backend(list(prompt_ids))
            with handoff:
                if abandoned:
                    backend.close()  # under the engine's lock, as run_blocking holds it
                    return None
                made.append(backend)
            return backend

        try:
            backend = await self.run_blocking(open_backend)
        except BaseException:
            with handoff:
                abandoned = True
            if made:  # made as the stop came: released in a thread, without waiting (nothing may be awaited now)
                asyncio.get_running_loop().run_in_executor(None, self._locked, made[0].close)
            raise
        return LocalSession(self, backend, sampling.merged(self.default_sampling()))

    def _locked(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            return fn()


@dataclass
class LocalSession(Session):
    engine: LocalEngine
    backend: LocalBackend
    sampling: Sampling
    pending: list[int] = field(default_factory=list)  # a held-back boundary word, fed first next step
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    @property
    def n_tokens(self) -> int:
        return self.backend.n_tokens + len(self.pending)

    # -- reasoning and answers ----------------------------------------------------------------
    async def extend(self, max_tokens: int, rules: StepRules, *, run_ahead: bool = False) -> AsyncGenerator[str | StepOutput, None]:
        eng, be = self.engine, self.backend
        window = eng.context_window
        room = window - 1 - be.n_tokens if window is not None else max_tokens
        held, self.pending = self.pending, []
        scanner = StepScanner(eng.detokenize, rules, eng.eos_token_ids, max(1, min(max_tokens, room)), held)
        sampling = self.sampling.greedy() if rules.greedy else self.sampling
        if held:
            await eng.run_blocking(be.feed, held)
        while scanner.end is None:
            await eng.run_blocking(self._sample_chunk, scanner, sampling)
            piece = scanner.take_text()
            if piece:
                yield piece
        piece = scanner.take_text()
        if piece:
            yield piece
        end = scanner.end
        self.pending = list(end.carry)
        yield StepOutput(scanner.ids[: end.keep], scanner.kept_text(), end.kind)

    def _sample_chunk(self, scanner: StepScanner, sampling: Sampling) -> None:
        """A few tokens through the scanner (worker thread, engine lock held). A token is fed to
        the model only once the scanner keeps it; at a word boundary the word's tokens already fed
        are cut back off the cache."""
        be = self.backend
        for _ in range(LOCAL_CHUNK_TOKENS):
            tok = sample_token(be.logits(), sampling, self.rng)
            end = scanner.feed(tok)
            if end is None:
                be.feed([tok])
                continue
            fed = len(scanner.ids) - 1 if end.kind != "eos" else len(scanner.ids)
            if end.keep > fed:
                be.feed([tok])
            elif end.keep < fed:
                if be.can_crop:
                    be.crop(be.n_tokens - (fed - end.keep))
                else:  # a cache that cannot be cut back keeps the word's first tokens; only the rest is carried
                    scanner.end = replace(end, keep=fed, carry=end.carry[len(end.carry) - (len(scanner.ids) - fed) :])
            return

    # -- probing ----------------------------------------------------------------------------
    def _probe(self, prompt_ids: Sequence[int], max_tokens: int) -> ProbeOutput:
        eng, be = self.engine, self.backend
        snap = be.snapshot()  # the context as committed: a held-back boundary word is not part of it
        scanner = StepScanner(eng.detokenize, StepRules(close_box=True, greedy=True), eng.eos_token_ids, max_tokens)
        lps: list[float] = []
        try:
            be.feed(list(prompt_ids))
            while scanner.end is None and be.n_tokens < (eng.context_window or 1 << 60):
                logits = be.logits()
                tok = int(np.argmax(logits))
                lps.append(float(log_softmax(logits)[tok]))
                if scanner.feed(tok) is None:
                    be.feed([tok])
        finally:
            be.restore(snap)
        return ProbeOutput(list(scanner.ids), lps[: len(scanner.ids)], len(prompt_ids))

    async def probe(self, prompt_ids: Sequence[int], max_tokens: int = 20) -> ProbeOutput:
        return await self.engine.run_blocking(self._probe, prompt_ids, max_tokens)

    # -- forcing ----------------------------------------------------------------------------
    def _append(self, ids: Sequence[int]) -> None:
        self.pending = []  # forcing after a word boundary: the held-back word is dropped, never said
        if self.engine.context_window is not None and self.backend.n_tokens + len(ids) >= self.engine.context_window:
            raise ContextTooLong(f"the context would exceed the model's window of {self.engine.context_window} tokens")
        if ids:
            self.backend.feed(ids)

    async def append(self, ids: Sequence[int]) -> None:
        await self.engine.run_blocking(self._append, ids)

    def _rollback(self, n_tokens: int) -> None:
        self.pending = []
        if not self.backend.can_crop:
            raise CodestopError("answer_from: this model's cache cannot be cut back; use answer_from='stop'")
        self.backend.crop(n_tokens)  # stale logits: the append that follows feeds fresh ones

    async def rollback(self, n_tokens: int) -> None:
        await self.engine.run_blocking(self._rollback, n_tokens)

    async def close(self) -> None:
        await self.engine.run_blocking(self.backend.close)
