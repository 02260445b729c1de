"""The one loop: extend to the next step boundary, probe, ask the policy, continue or stop.

Live generation, trace recording, evaluation and the server all run :func:`agenerate`; it is async
so a server engine can drive many sessions on one event loop, and :func:`run_sync` is the facade
for everything else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from codestop.confidence import confidence_function
from codestop.engines.base import Boundaries, ContextTooLong, Engine, Sampling, Session
from codestop.families import Family
from codestop.grading import extract_boxed
from codestop.policies import Policy, Probe, policy_options

DEFAULT_MAX_NEW_TOKENS = 32768
DEFAULT_PROBE_INTERVAL = 32
PROBE_MAX_TOKENS = 20
ANSWER_MAX_TOKENS = 30  # a forced answer: the box's content
FREE_ANSWER_MAX_TOKENS = 1024  # the model's own answer after it closed its thinking itself

T = TypeVar("T")


@dataclass
class Event:
    """Something the controller did, for live display: kind is "reasoning" (text), "probe"
    (probe), "stop" (reason, position) or "answer" (text)."""

    kind: str
    text: str = ""
    probe: Probe | None = None
    reason: str | None = None
    position: int | None = None


EventCallback = Callable[[Event], None]


@dataclass
class Result:
    """What one question cost and produced. Token counts by kind: ``prompt`` (the question prompt),
    ``reasoning`` (thinking tokens the model generated), ``probe`` (tokens the probes generated),
    ``probe_prompt`` (probe-prompt tokens prefilled), ``answer`` (forced or free answer tokens).
    ``cost`` = reasoning + probe + answer, the paper's accounting. Times are seconds by phase."""

    question: str
    answer: str | None
    answer_text: str
    reasoning_text: str
    stop_reason: str
    stop_position: int
    probes: list[Probe]
    tokens: dict[str, int]
    timings: dict[str, float]
    method: dict[str, Any]
    model: str
    engine: str
    family: str

    @property
    def cost(self) -> int:
        return self.tokens["reasoning"] + self.tokens["probe"] + self.tokens["answer"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost"] = self.cost
        for p in d["probes"]:
            if p.get("token_logprobs") is not None:
                p["token_logprobs"] = list(p["token_logprobs"])
        return d


@dataclass
class _Clock:
    times: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "reasoning": 0.0, "probe": 0.0, "answer": 0.0})

    async def timed(self, phase: str, coro: Coroutine[Any, Any, T]) -> T:
        t0 = time.perf_counter()
        try:
            return await coro
        finally:
            self.times[phase] += time.perf_counter() - t0


def probe_from_output(out: Any, position: int, confidence_name: str, engine: Engine) -> Probe:
    """Score a probe continuation: answer = box content, confidence over the answer tokens."""
    from codestop.engines.base import answer_span

    pieces = [engine.detokenize([t]) for t in out.token_ids]
    answer, n_answer = answer_span(pieces)
    lps = tuple(min(0.0, lp) for lp in out.logprobs[:n_answer])
    conf = confidence_function(confidence_name)(lps)
    return Probe(
        position=position,
        confidence=min(1.0, max(0.0, conf)),
        answer=answer,
        text=out.text,
        token_logprobs=lps,
        tokens=len(out.token_ids),
    )


async def agenerate(
    engine: Engine,
    question: str,
    policy: Policy,
    family: Family,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    probe_interval: int = DEFAULT_PROBE_INTERVAL,
    boundaries: Boundaries = Boundaries(),
    sampling: Sampling = Sampling(),
    probe_every_boundary: bool = False,
    on_event: EventCallback | None = None,
) -> Result:
    """Answer ``question`` on ``engine`` under ``policy``.

    ``probe_every_boundary`` probes at every boundary even when the policy needs none (recording
    traces); the policy still decides. ``probe_interval`` is the least number of reasoning tokens
    between two probes."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens!r} must be >= 1")
    if probe_interval < 0:
        raise ValueError(f"probe_interval: {probe_interval!r} must be >= 0")
    emit = on_event or (lambda e: None)
    clock = _Clock()
    t_start = time.perf_counter()
    prompt_ids = engine.tokenize(family.build_prompt(engine, question))
    if engine.bos_token_id is not None and (not prompt_ids or prompt_ids[0] != engine.bos_token_id):
        prompt_ids = [engine.bos_token_id, *prompt_ids]
    session: Session = await clock.timed("prefill", engine.start(prompt_ids, sampling))
    try:
        probe_ids = engine.tokenize(family.probe_prompt)
        cap = max_new_tokens
        if policy.max_reasoning_tokens is not None:
            cap = min(cap, policy.max_reasoning_tokens)
        if engine.context_window is not None:
            # leave room for a probe and a forced answer inside the window
            room = engine.context_window - len(prompt_ids) - len(probe_ids) - PROBE_MAX_TOKENS - 64
            if room < 1:
                raise ContextTooLong(
                    f"the prompt is {len(prompt_ids)} tokens and leaves no room to reason in the model's "
                    f"{engine.context_window}-token window; shorten the question"
                )
            cap = min(cap, room)
        stop_texts = (family.think_end,) if family.thinks else ()
        tracker = policy.start()
        probing = policy.needs_probes or probe_every_boundary
        probes: list[Probe] = []
        reasoning_ids: list[int] = []
        reasoning_text = ""
        probe_tokens = probe_prompt_tokens = 0
        last_probe_at = 0
        stop_reason = ""

        def show(text: str) -> None:
            emit(Event("reasoning", text=text))

        while True:
            step = await clock.timed(
                "reasoning", session.extend(cap - len(reasoning_ids), boundaries, stop_texts, on_text=show)
            )
            reasoning_ids += step.token_ids
            reasoning_text += step.text
            position = len(reasoning_ids)
            if step.end in ("eos", "stop_text"):
                stop_reason = "finished"
                break
            if position >= cap:
                stop_reason = "budget"
                break
            if not probing or position == 0 or position - last_probe_at < max(1, probe_interval):
                continue
            out = await clock.timed("probe", session.probe(probe_ids, PROBE_MAX_TOKENS))
            last_probe_at = position
            probe_tokens += len(out.token_ids)
            probe_prompt_tokens += out.prompt_tokens
            probe = probe_from_output(out, position, policy.confidence, engine)
            probes.append(probe)
            emit(Event("probe", probe=probe))
            decision = tracker.update(probe)
            if decision.stop:
                stop_reason = decision.reason or "budget"
                break

        stop_position = len(reasoning_ids)
        emit(Event("stop", reason=stop_reason, position=stop_position))
        answer_ids: list[int] = []
        if stop_reason == "finished" and (family.thinks or step.end == "eos"):
            if family.thinks and step.end == "stop_text":
                # the model closed its thinking: let it write its own answer
                out_step = await clock.timed(
                    "answer", session.generate(FREE_ANSWER_MAX_TOKENS, on_text=lambda t: emit(Event("answer", text=t)))
                )
                answer_text = out_step.text
                answer_ids = out_step.token_ids
            else:
                answer_text = ""
            answer = extract_boxed(answer_text) if answer_text else None
            if answer is None and not family.thinks:
                answer = extract_boxed(reasoning_text)
            if answer is None:
                # no box written: ask for it (costs a few answer tokens)
                forced, forced_ids = await _force_answer(engine, session, family, reasoning_text, clock, emit)
                answer_text += forced
                answer_ids += forced_ids
                answer = extract_boxed(answer_text) or _box_content(forced)
        else:
            answer_text, answer_ids = await _force_answer(engine, session, family, reasoning_text, clock, emit)
            answer = _box_content(answer_text)

        timings = dict(clock.times)
        timings["total"] = time.perf_counter() - t_start
        return Result(
            question=question,
            answer=answer,
            answer_text=answer_text,
            reasoning_text=reasoning_text,
            stop_reason=stop_reason,
            stop_position=stop_position,
            probes=probes,
            tokens={
                "prompt": len(prompt_ids),
                "reasoning": len(reasoning_ids),
                "probe": probe_tokens,
                "probe_prompt": probe_prompt_tokens,
                "answer": len(answer_ids),
            },
            timings=timings,
            method=policy_options(policy),
            model=engine.model_name,
            engine=engine.name,
            family=family.name,
        )
    finally:
        await session.close()


async def _force_answer(
    engine: Engine, session: Session, family: Family, reasoning_text: str, clock: _Clock, emit: EventCallback
) -> tuple[str, list[int]]:
    """Close the thinking and decode the box's content greedily; returns (text, generated ids)."""
    forced = family.forced_answer_text()
    if not family.thinks and reasoning_text.endswith("\n\n"):
        forced = forced.lstrip("\n")
    emit(Event("answer", text=forced))
    await clock.timed("answer", session.append(engine.tokenize(forced)))
    out = await clock.timed(
        "answer", session.generate(ANSWER_MAX_TOKENS, on_text=lambda t: emit(Event("answer", text=t)), close_box=True)
    )
    return forced + out.text, out.token_ids


def _box_content(answer_text: str) -> str | None:
    """The answer after a forced ``\\boxed{``: the text up to its closing brace."""
    from codestop.engines.base import closing_brace_index

    start = answer_text.rfind("\\boxed{")
    if start == -1:
        return extract_boxed(answer_text)
    rest = answer_text[start + len("\\boxed{") :]
    end = closing_brace_index(rest)
    content = (rest[:end] if end is not None else rest).strip()
    return content or None


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code (the facade over the async loop)."""
    return asyncio.run(coro)
