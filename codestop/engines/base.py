"""The engine interface: how tokens and probabilities are obtained, and nothing about stopping.

An :class:`Engine` owns a model (and its tokenizer) and starts :class:`Session` objects, one per
question. A session holds one growing context and offers four async operations:

* ``extend(max_tokens, boundaries, stop_texts)``: sample reasoning tokens until a step boundary,
  a stop text (e.g. ``</think>``), EOS, or ``max_tokens``;
* ``probe(prompt_ids, max_tokens)``: greedily decode a short continuation of context + prompt,
  returning its tokens and their log-probabilities, and leave the session exactly as it was;
* ``append(ids)``: force tokens into the context (closing the thinking, the answer prompt);
* ``generate(max_tokens, stop_texts)``: greedy continuation that is kept (the final answer).

Methods are async so one event loop can drive many sessions on a server engine; in-process engines
run their blocking work in a worker thread under one lock per engine (the model is the bottleneck
anyway). The controller's sync facade is ``asyncio.run``.

In-process engines (transformers, llama.cpp) share :class:`LocalSession`, which implements
boundaries, sampling and probing once on top of four primitives: feed tokens, crop the context,
read the last logits, count context tokens.
"""

from __future__ import annotations

import abc
import asyncio
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

TextCallback = Callable[[str], None]


class CodestopError(Exception):
    """An error a user can cause and fix; the CLI prints its message alone, no traceback."""


class ContextTooLong(CodestopError):
    pass


@dataclass(frozen=True)
class Sampling:
    """Sampling for the reasoning itself. None means the model's own default (its generation
    config); temperature 0 means greedy."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature: {self.temperature!r} must be >= 0")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p: {self.top_p!r} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k!r} must be >= 0 (0 = off)")

    def merged(self, defaults: "Sampling") -> "Sampling":
        """Fill the unset fields from ``defaults`` (the model's generation config)."""
        return Sampling(
            temperature=self.temperature if self.temperature is not None else defaults.temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            top_k=self.top_k if self.top_k is not None else defaults.top_k,
            seed=self.seed if self.seed is not None else defaults.seed,
        )


@dataclass(frozen=True)
class Boundaries:
    """Step boundaries. ``separators`` (e.g. a blank line) end a step just after them; ``words``
    (e.g. "Wait") end a step just before them, so the probe's context does not contain the word.
    Words match at a word start, case-sensitively."""

    separators: tuple[str, ...] = ("\n\n",)
    words: tuple[str, ...] = ("Wait", "But wait", "Alternatively")

    @classmethod
    def parse(cls, spec: Sequence[str]) -> "Boundaries":
        """From a list such as ["\\n\\n", "Wait"]: whitespace-only entries are separators."""
        seps = tuple(s for s in spec if s and not s.strip())
        words = tuple(s for s in spec if s.strip())
        if not seps and not words:
            raise ValueError("boundaries: at least one boundary is needed")
        return cls(seps, words)

    def as_list(self) -> list[str]:
        return [*self.separators, *self.words]


@dataclass
class StepOutput:
    """What ``extend``/``generate`` produced. token_ids were committed to the context (for word
    boundaries, the word itself is held back and starts the next step)."""

    token_ids: list[int]
    text: str
    end: Literal["boundary", "stop_text", "eos", "budget"]


@dataclass
class ProbeOutput:
    """A probe's greedy continuation: its tokens, text and per-token log-probabilities (natural log,
    of the chosen token under the model's raw distribution), and how many prompt tokens it prefilled."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    prompt_tokens: int


class Session(abc.ABC):
    """One question's live context on an engine."""

    @property
    @abc.abstractmethod
    def n_tokens(self) -> int:
        """Tokens in the context now (prompt included)."""

    @abc.abstractmethod
    async def extend(
        self,
        max_tokens: int,
        boundaries: Boundaries,
        stop_texts: Sequence[str] = (),
        on_text: TextCallback | None = None,
    ) -> StepOutput: ...

    @abc.abstractmethod
    async def probe(self, prompt_ids: Sequence[int], max_tokens: int = 20) -> ProbeOutput: ...

    @abc.abstractmethod
    async def append(self, ids: Sequence[int]) -> None: ...

    @abc.abstractmethod
    async def generate(
        self,
        max_tokens: int,
        stop_texts: Sequence[str] = (),
        on_text: TextCallback | None = None,
        close_box: bool = False,
    ) -> StepOutput:
        """Greedy continuation kept in the context (the final answer). ``close_box``: the context
        ends inside ``\\boxed{``; stop at the "}" that closes it (end "stop_text")."""

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

    def default_sampling(self) -> Sampling:
        """The model's own sampling defaults (generation config); greedy when it has none."""
        return Sampling(temperature=0.0)

    def model_info(self) -> dict[str, Any]:
        """What identifies the model for family detection: name, model_type, chat template."""
        return {"name": self.model_name, "model_type": "", "chat_template": ""}

    @abc.abstractmethod
    async def start(self, prompt_ids: Sequence[int], sampling: Sampling) -> Session: ...

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release the engine's resources."""


# --------------------------------------------------------------------------------------------
# Text helpers shared by every engine
# --------------------------------------------------------------------------------------------


def find_word_boundary(text: str, words: Sequence[str], search_from: int) -> int | None:
    """Start index of the first boundary word in ``text`` that begins at or after ``search_from``,
    at a word start (start of text or after whitespace/punctuation) and not followed by a letter."""
    best: int | None = None
    for word in words:
        for m in re.finditer(re.escape(word), text[max(0, search_from - len(word)) :]):
            start = m.start() + max(0, search_from - len(word))
            if start < search_from:
                continue
            if start > 0 and text[start - 1].isalnum():
                continue
            end = start + len(word)
            if end < len(text) and text[end].isalpha():
                continue
            if best is None or start < best:
                best = start
    return best


def closing_brace_index(text: str) -> int | None:
    """Index of the "}" that closes a box opened just before ``text`` (depth starts at 1)."""
    depth = 1
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def answer_span(token_texts: Sequence[str]) -> tuple[str, int]:
    """For a probe continuation after ``\\boxed{``: the answer (text before the closing brace) and
    how many leading tokens are answer tokens. The token that holds the closing brace counts as an
    answer token only when it also carries answer text before the brace (e.g. "5}")."""
    text = ""
    for n, piece in enumerate(token_texts):
        idx = closing_brace_index(text + piece)
        if idx is not None:
            has_content = idx > len(text) and (text + piece)[len(text) : idx].strip() != ""
            return (text + piece)[:idx].strip(), n + (1 if has_content else 0)
        text += piece
    return text.strip(), len(token_texts)


# --------------------------------------------------------------------------------------------
# In-process sessions: boundaries, sampling and probing on four primitives
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
        pass


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

    async def start(self, prompt_ids: Sequence[int], sampling: Sampling) -> "LocalSession":
        if not prompt_ids:
            raise ValueError("prompt_ids: the prompt is empty")
        if self.context_window is not None and len(prompt_ids) >= self.context_window:
            raise ContextTooLong(
                f"the prompt is {len(prompt_ids)} tokens but the model's context window is {self.context_window}; "
                "shorten the question or use a model with a longer context"
            )
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

    def _room(self) -> int:
        window = self.engine.context_window
        return max(0, window - self.backend.n_tokens - 1) if window is not None else 1 << 60

    # -- reasoning --------------------------------------------------------------------------
    def _extend(
        self,
        max_tokens: int,
        boundaries: Boundaries,
        stop_texts: Sequence[str],
        on_text: TextCallback | None,
        greedy: bool,
        close_box: bool = False,
    ) -> StepOutput:
        eng, be = self.engine, self.backend
        step: list[int] = []
        text = ""
        if self.pending:  # the word held back at the last boundary starts this step (already shown)
            be.feed(self.pending)
            step, self.pending = list(self.pending), []
            text = eng.detokenize(step)
        word_search_from = max(1, len(text))  # never the held-back word itself
        sampling = Sampling(temperature=0.0) if greedy else self.sampling
        while True:
            if len(step) >= max_tokens or self._room() <= 0:
                return StepOutput(step, text, "budget")
            tok = sample_token(be.logits(), sampling, self.rng)
            if tok in eng.eos_token_ids:
                return StepOutput(step, text, "eos")
            new_text = eng.detokenize(step + [tok])
            added = new_text[len(text) :]
            if close_box and closing_brace_index(new_text) is not None:
                be.feed([tok])
                step.append(tok)
                if on_text:
                    on_text(added)
                return StepOutput(step, new_text, "stop_text")
            # a stop text (e.g. </think>) written by the model: keep it and end
            for stop in stop_texts:
                if new_text.find(stop, max(0, len(text) - len(stop) + 1)) != -1:
                    be.feed([tok])
                    step.append(tok)
                    if on_text:
                        on_text(added)
                    return StepOutput(step, new_text, "stop_text")
            if boundaries.words:
                at = find_word_boundary(new_text, boundaries.words, word_search_from)
                if at is not None:
                    # hold back every token that carries part of the word: they start the next step,
                    # so the probe's context ends just before the word
                    keep = len(step)
                    while be.can_crop and keep > 0 and len(eng.detokenize(step[:keep])) > at:
                        keep -= 1
                    if keep < len(step):
                        be.crop(be.n_tokens - (len(step) - keep))
                    self.pending = step[keep:] + [tok]
                    if on_text and added:
                        on_text(added)
                    return StepOutput(step[:keep], eng.detokenize(step[:keep]), "boundary")
            be.feed([tok])
            step.append(tok)
            if on_text and added:
                on_text(added)
            prev_len = len(text)
            text = new_text
            if any(sep in text[max(0, prev_len - len(sep) + 1) :] for sep in boundaries.separators):
                return StepOutput(step, text, "boundary")

    async def extend(
        self,
        max_tokens: int,
        boundaries: Boundaries,
        stop_texts: Sequence[str] = (),
        on_text: TextCallback | None = None,
    ) -> StepOutput:
        return await self.engine.run_blocking(self._extend, max_tokens, boundaries, stop_texts, on_text, False)

    # -- probing ----------------------------------------------------------------------------
    def _probe(self, prompt_ids: Sequence[int], max_tokens: int) -> ProbeOutput:
        eng, be = self.engine, self.backend
        # the context as committed: a held-back boundary word is not part of it
        snap = be.snapshot()
        ids: list[int] = []
        lps: list[float] = []
        try:
            be.feed(list(prompt_ids))
            for _ in range(max_tokens):
                if be.n_tokens >= (eng.context_window or 1 << 60):
                    break
                logits = be.logits()
                tok = int(np.argmax(logits))
                ids.append(tok)
                lps.append(float(log_softmax(logits)[tok]))
                if tok in eng.eos_token_ids:
                    break
                if closing_brace_index(eng.detokenize(ids)) is not None:
                    break
                if len(ids) < max_tokens:
                    be.feed([tok])
        finally:
            be.restore(snap)
        return ProbeOutput(ids, eng.detokenize(ids), lps, len(prompt_ids))

    async def probe(self, prompt_ids: Sequence[int], max_tokens: int = 20) -> ProbeOutput:
        return await self.engine.run_blocking(self._probe, prompt_ids, max_tokens)

    # -- forcing and answering --------------------------------------------------------------
    def _append(self, ids: Sequence[int]) -> None:
        self.pending = []  # forcing after a word boundary: the held-back word is dropped, never said
        if self.engine.context_window is not None and self.backend.n_tokens + len(ids) >= self.engine.context_window:
            raise ContextTooLong(
                f"the context would exceed the model's window of {self.engine.context_window} tokens"
            )
        if ids:
            self.backend.feed(ids)

    async def append(self, ids: Sequence[int]) -> None:
        await self.engine.run_blocking(self._append, ids)

    async def generate(
        self,
        max_tokens: int,
        stop_texts: Sequence[str] = (),
        on_text: TextCallback | None = None,
        close_box: bool = False,
    ) -> StepOutput:
        return await self.engine.run_blocking(
            self._extend, max_tokens, Boundaries((), ()), stop_texts, on_text, True, close_box
        )

    async def close(self) -> None:
        self.backend.close()
