"""The Python API: ``load`` a model once, ``generate`` as often as you like."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from codestop.controller import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROBE_INTERVAL,
    EventCallback,
    Result,
    agenerate,
    run_sync,
)
from codestop.engines.base import Boundaries, Engine, Sampling
from codestop.families import get_family
from codestop.models import load_engine
from codestop.policies import CodeStop, Policy


def load(model: str, *, engine: str | None = None, **options: Any) -> Engine:
    """Load a model: a hub id, a local HF directory, a .gguf file, or a preset name.

    Options go to the engine (dtype, device, threads, ...). The returned engine is what
    :func:`generate` takes; load once, generate many times."""
    return load_engine(model, engine=engine, **options)


async def agenerate_question(
    model: Engine,
    question: str,
    policy: Policy | None = None,
    *,
    family: str | None = None,
    enable_thinking: bool | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    probe_interval: int = DEFAULT_PROBE_INTERVAL,
    boundaries: Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    probe_every_boundary: bool = False,
    on_event: EventCallback | None = None,
) -> Result:
    """Async :func:`generate`, for callers that already run an event loop."""
    return await agenerate(
        model,
        question,
        policy if policy is not None else CodeStop(),
        get_family(family, model, enable_thinking),
        max_new_tokens=max_new_tokens,
        probe_interval=probe_interval,
        boundaries=Boundaries.parse(boundaries) if boundaries is not None else Boundaries(),
        sampling=Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        probe_every_boundary=probe_every_boundary,
        on_event=on_event,
    )


def generate(model: Engine | str, question: str, policy: Policy | None = None, **options: Any) -> Result:
    """Answer ``question`` with ``model`` under ``policy`` (CoDE-Stop with its defaults when None).

    ``model`` is an engine from :func:`load` (reused) or a model name (loaded for this call only).
    Options: family, enable_thinking, max_new_tokens, probe_interval, boundaries, temperature,
    top_p, top_k, seed, on_event."""
    engine = load(model) if isinstance(model, str) else model
    return run_sync(agenerate_question(engine, question, policy, **options))
