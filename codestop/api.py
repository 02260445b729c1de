"""The Python API: ``load`` a model once, ``generate`` as often as you like."""

from __future__ import annotations

from typing import Any

from codestop.config import GenerationConfig
from codestop.controller import EventCallback, Result, agenerate, run_sync
from codestop.engines.base import Engine
from codestop.models import load_engine
from codestop.policies import CodeStop, Policy


def load(model: str, *, engine: str | None = None, **options: Any) -> Engine:
    """Load a model: a hub id, a local HF directory, a .gguf file, or a preset name.

    Options go to the engine (dtype, device, threads, base_url, retries, ...; see
    :func:`codestop.models.load_engine`); one the engine does not take is an error naming it. The
    returned engine is what :func:`generate` takes; load once, generate many times."""
    return load_engine(model, engine=engine, **options)


async def agenerate_question(
    model: Engine,
    question: str,
    policy: Policy | None = None,
    config: GenerationConfig | None = None,
    *,
    on_event: EventCallback | None = None,
    **options: Any,
) -> Result:
    """Async :func:`generate` on a loaded engine, for callers that already run an event loop."""
    config = (config or GenerationConfig()).with_options(options)
    return await agenerate(model, question, policy if policy is not None else CodeStop(), config, on_event=on_event)


def generate(
    model: Engine | str,
    question: str,
    policy: Policy | None = None,
    config: GenerationConfig | None = None,
    *,
    on_event: EventCallback | None = None,
    **options: Any,
) -> Result:
    """Answer ``question`` with ``model`` under ``policy`` (CoDE-Stop with its defaults when None).

    ``model`` is an engine from :func:`load` (reused) or a model name (loaded for this call and
    freed after it). ``options`` are :class:`~codestop.config.GenerationConfig` fields
    (max_reasoning_tokens, probe_interval, boundaries, temperature, top_p, top_k, seed, family,
    enable_thinking) applied over ``config``; ``on_event`` sees each event as it happens."""
    config = (config or GenerationConfig()).with_options(options)  # a bad option fails before any loading
    engine = load(model) if isinstance(model, str) else model
    try:
        return run_sync(agenerate_question(engine, question, policy, config, on_event=on_event))
    finally:
        if isinstance(model, str):
            run_sync(engine.aclose())
