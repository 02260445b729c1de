"""The engine interface: how tokens and probabilities are obtained, and nothing about stopping.

An :class:`Engine` owns a model (and its tokenizer) and starts :class:`Session` objects, one per
question. A session holds one growing context and offers:

* ``extend(max_tokens, rules)``: generate until the step ends by the rules of
  :mod:`codestop.steps` (a boundary, a stop text, EOS, ``max_tokens``), yielding the step's text as
  it becomes certain and then one :class:`StepOutput`; the final answer is a greedy step;
* ``probe(prompt_ids, max_tokens)``: greedily decode a short continuation of context + prompt,
  returning its tokens and their log-probabilities, and leave the session exactly as it was;
* ``append(ids)``: force tokens into the context (closing the thinking, the answer prompt).

Everything is async so one event loop drives many sessions; text and events are always produced
on the event loop. In-process engines (transformers, llama.cpp) share the session of
:mod:`codestop.engines.local`; the completions-server engine is :mod:`codestop.engines.server`.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from codestop.errors import CodestopError, ContextTooLong
from codestop.sampling import Sampling
from codestop.steps import EndKind, StepRules

# a counter's key in :meth:`Engine.counters`: its kind, or label pairs such as (("kind", "step"), ("replica", url))
CounterKey = str | tuple[tuple[str, str], ...]


def check_options(engine: str, options: Collection[str], known: Sequence[str]) -> None:
    """An error naming every option ``engine`` does not take, with the closest name it does take
    (a misspelt option, or another engine's, must not be dropped silently)."""
    unknown = sorted(set(options) - set(known))
    if not unknown:
        return
    guesses = {name: close[0] for name in unknown if (close := difflib.get_close_matches(name, known, n=1))}
    hint = ""
    if len(unknown) == 1 and guesses:
        hint = f" (did you mean {guesses[unknown[0]]}?)"
    elif guesses:
        hint = " (did you mean " + ", ".join(f"{right} for {wrong}" for wrong, right in guesses.items()) + "?)"
    plural = "s" if len(unknown) > 1 else ""
    raise CodestopError(f"{', '.join(unknown)}: unknown option{plural} of the {engine} engine{hint}; it takes {', '.join(known)}")


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
