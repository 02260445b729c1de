"""The engine interface: how tokens and probabilities are obtained, and nothing about stopping.

An :class:`Engine` owns a model (and its tokenizer) and starts :class:`Session` objects, one per
question. A session holds one growing context and offers:

* ``extend(max_tokens, rules)``: generate until the step ends by the rules of
  :mod:`codestop.steps` (a boundary, a stop text, EOS, ``max_tokens``), yielding the step's text as
  it becomes certain and then one :class:`StepOutput`; the final answer is a greedy step;
* ``probe(prompt_ids, max_tokens)``: greedily decode a short continuation of context + prompt,
  returning its tokens and their log-probabilities, and leave the session exactly as it was;
* ``append(ids)``: force tokens into the context (closing the thinking, the answer prompt).

Everything is async so one event loop drives many sessions. In-process engines run their blocking
work in a worker thread under one lock per engine, a few tokens at a time, so a long step never
holds the model for long, other sessions interleave, and a cancelled request stops between chunks.
Text and events are always produced on the event loop.

In-process engines (transformers, llama.cpp) share :class:`LocalSession`, which samples on four
primitives (feed tokens, crop the context, read the last logits, count context tokens) and feeds
each token to the one step scanner.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from codestop.errors import CodestopError, ContextTooLong
from codestop.sampling import Sampling
from codestop.steps import EndKind, StepRules, StepScanner

# a counter's key in :meth:`Engine.counters`: its kind, or label pairs such as (("kind", "step"), ("replica", url))
CounterKey = str | tuple[tuple[str, str], ...]
LOCAL_CHUNK_TOKENS = 4  # tokens per locked worker-thread call: the latency of a cancel, the grain of interleaving


@dataclass
class StepOutput:
    """A finished step: the tokens committed to the context (a boundary word's tokens are held
    back and start the next step), their text, and how the step ended."""

    token_ids: list[int]
    text: str
    end: EndKind


@dataclass
class ProbeOutput:
    """A probe's greedy continuation: its tokens and per-token log-probabilities (natural log, of
    the chosen token under the model's raw distribution), and how many prompt tokens it prefilled."""

    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int


class Session(abc.ABC):
    """One question's live context on an engine.

    ``overrun``: tokens the engine generated past a step's end and then dropped (a reasoning
    stream that ran ahead of a stop, see ``extend(run_ahead=True)``): generated, so paid for."""

    overrun: int = 0

    @property
    @abc.abstractmethod
    def n_tokens(self) -> int:
        """Tokens in the context now (prompt included)."""

    @abc.abstractmethod
    def extend(self, max_tokens: int, rules: StepRules, *, run_ahead: bool = False) -> AsyncGenerator[str | StepOutput, None]:
        """Generate one step: yields text pieces as they become certain, then the StepOutput.
        ``run_ahead``: the engine may go on generating past the step's end while the caller probes
        (the next ``extend`` with the same rules takes those tokens first); engines that cannot
        overlap a probe with generation ignore it."""

    async def halt(self) -> None:  # noqa: B027 - optional
        """Stop generating ahead: what was generated past the last step is dropped (``overrun``)."""

    async def step(self, max_tokens: int, rules: StepRules = StepRules()) -> StepOutput:
        """:meth:`extend` run to its StepOutput (for callers that do not show the text)."""
        out: StepOutput | None = None
        async for item in self.extend(max_tokens, rules):
            if isinstance(item, StepOutput):
                out = item
        assert out is not None
        return out

    @abc.abstractmethod
    async def probe(self, prompt_ids: Sequence[int], max_tokens: int = 20) -> ProbeOutput: ...

    @abc.abstractmethod
    async def append(self, ids: Sequence[int]) -> None: ...

    @abc.abstractmethod
    async def rollback(self, n_tokens: int) -> None:
        """Cut the context back to its first ``n_tokens`` tokens (an answer from an earlier
        checkpoint); the next call is an ``append``."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release what the session holds."""


class Engine(abc.ABC):
    """A model and its tokenizer, able to start sessions."""

    name: str = "engine"  # "transformers", "llamacpp", "server"
    model_name: str = ""  # what the user asked for, for Results and trace headers
    context_window: int | None = None

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens in the text parsed as such, no BOS added."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def bos_token_id(self) -> int | None:
        return None

    @abc.abstractmethod
    def chat_template(self, messages: list[dict[str, str]], **template_kwargs: Any) -> str:
        """The model's chat template rendered with add_generation_prompt=True."""

    async def run_tokenizer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a tokenizer or template call from the event loop. Engines whose tokenizer is remote
        run it in a worker thread; a local tokenizer answers at once."""
        return fn(*args)

    def default_sampling(self) -> Sampling:
        """The model's own sampling defaults (generation config); greedy when it has none."""
        return Sampling(temperature=0.0)

    def model_info(self) -> dict[str, Any]:
        """What identifies the model for family detection: name, model_type, chat template."""
        return {"name": self.model_name, "model_type": "", "chat_template": ""}

    @abc.abstractmethod
    async def start(self, prompt_ids: Sequence[int], sampling: Sampling, *, live: bool = False) -> Session:
        """A session holding ``prompt_ids``. ``live``: its text is shown as it comes (server
        engines then stream each step token by token)."""

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids: the prompt is empty")
        if self.context_window is not None and len(prompt_ids) >= self.context_window:
            raise ContextTooLong(
                f"the prompt is {len(prompt_ids)} tokens but the model's context window is {self.context_window}; "
                "shorten the question or use a model with a longer context"
            )

    async def ready(self) -> None:  # noqa: B027 - optional
        """Raise a CodestopError when the engine cannot start a question now (a completions server
        still starting: 503); instant otherwise. Call it before :func:`codestop.controller.astream`."""

    async def health(self) -> dict[str, Any]:
        """Whether the engine can answer now (the proxy's /health): ``{"ok": bool, ...}``."""
        return {"ok": True}

    def counters(self) -> dict[str, dict[CounterKey, float]]:
        """Counters for the proxy's /metrics: ``{name: {kind: count}}``, exported as
        ``codestop_<name>_total`` with one label ``kind`` (key "" for a counter without it), e.g.
        the server engine's ``{"upstream_requests": {"step": 12, "probe": 4}, "upstream_retries": {"": 1}}``;
        a key may instead be label pairs, e.g. ``(("kind", "step"), ("replica", url))``."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release the engine's resources."""


# --------------------------------------------------------------------------------------------
# In-process sessions: sampling on four primitives, steps by the one scanner
# --------------------------------------------------------------------------------------------


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
        backend = await self.run_blocking(self.new_backend, list(prompt_ids))
        return LocalSession(self, backend, sampling.merged(self.default_sampling()))


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
