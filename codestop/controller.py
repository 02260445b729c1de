"""The one loop: extend to the next step boundary, probe, ask the policy, continue or stop.

:func:`astream` is the loop as a stream of events (reasoning text, probe, stop, answer text) that
ends with the :class:`Result`; live views, the proxy, evaluation and recording all run it.
:func:`agenerate` consumes it, and :func:`run_sync` is the facade for sync code. The stream owns
its session: closing it early (a client gone, a cancelled task) closes the session, so nothing
keeps generating for nobody.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from contextlib import aclosing, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from codestop.confidence import score_probe
from codestop.config import GenerationConfig
from codestop.errors import CodestopError, ContextTooLong
from codestop.families import Family, get_family
from codestop.policies import MODEL_ENDED, NOT_EARLY, Policy, Probe, Vanilla, best_probe, policy_options
from codestop.steps import (
    IncrementalDecoder,
    StepRules,
    closing_brace_index,
    extract_boxed,
    probe_answer,
)

if TYPE_CHECKING:  # only annotations: replay and sweeps import cost_tokens without an engine
    from codestop.engines.base import Engine, ProbeOutput, Session, StepOutput

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


def cost_tokens(tokens: Mapping[str, int]) -> int:
    """What a run costs: reasoning + probe + answer + overrun tokens (the paper's accounting plus the
    overrun of overlapped probing); missing counts are 0, as in records written before a field existed
    and in replay, which knows no answer or overrun (docs/vocabulary.md). The one definition: live
    results, eval lines, the demo, replay and sweeps all cost through it."""
    return sum(int(tokens.get(k, 0)) for k in ("reasoning", "probe", "answer", "overrun"))


@dataclass
class Result:
    """What one question cost and produced. Token counts by kind: ``prompt`` (the question prompt),
    ``reasoning`` (thinking tokens the model generated), ``probe`` (tokens the probes generated),
    ``probe_prompt`` (probe-prompt tokens prefilled), ``answer`` (forced or free answer tokens),
    ``overrun`` (reasoning generated past the stop while its probe ran, then dropped: overlapped
    probing). ``cost_tokens`` = :func:`cost_tokens`: reasoning + probe + answer + overrun, the paper's
    accounting plus the overrun. ``policy``: the policy's options (``policy_options``). Times are
    seconds by phase."""

    question: str
    answer: str | None
    answer_text: str
    reasoning_text: str
    stop_reason: str
    answer_position: int  # reasoning tokens the answer followed: the stop, or the best probe (answer_from="best")
    probes: list[Probe]
    steps: int  # reasoning steps (boundary to boundary) the stream was cut into
    tokens: dict[str, int]
    timings: dict[str, float]
    policy: dict[str, Any]
    model: str
    engine: str
    family: str
    # a recording's probe at the end of the full reasoning (``config.always_probe`` and no early
    # stop): the reference answer of the label-free risk ``changed``, read as every probe is
    reference: Probe | None = None

    @property
    def cost_tokens(self) -> int:
        return cost_tokens(self.tokens)

    @property
    def cost(self) -> int:
        """Deprecated: ``cost_tokens`` (docs/vocabulary.md); removed in the next release."""
        warnings.warn("Result.cost is Result.cost_tokens under its old name", DeprecationWarning, stacklevel=2)
        return self.cost_tokens

    @property
    def stop_position(self) -> int:
        """Deprecated: always ``tokens["reasoning"]`` (docs/vocabulary.md); removed in the next release."""
        warnings.warn("Result.stop_position is Result.tokens['reasoning']", DeprecationWarning, stacklevel=2)
        return self.tokens["reasoning"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost_tokens"] = self.cost_tokens
        d["stop_position"] = self.tokens["reasoning"]  # the old key, written until the next release
        for p in [*d["probes"], *([d["reference"]] if d["reference"] else [])]:
            if p.get("token_logprobs") is not None:
                p["token_logprobs"] = list(p["token_logprobs"])
        return d


@dataclass
class _Clock:
    """Seconds spent waiting on the engine, by phase (time the consumer of the stream spends
    between events is not counted)."""

    times: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "reasoning": 0.0, "probe": 0.0, "answer": 0.0})

    async def timed(self, phase: str, coro: Coroutine[Any, Any, T]) -> T:
        t0 = time.perf_counter()
        try:
            return await coro
        finally:
            self.times[phase] += time.perf_counter() - t0

    async def step(self, phase: str, session: Session, max_tokens: int, rules: StepRules,
                   run_ahead: bool = False) -> AsyncIterator[str | StepOutput]:
        async with aclosing(session.extend(max_tokens, rules, run_ahead=run_ahead)) as items:
            while True:
                t0 = time.perf_counter()
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
                finally:
                    self.times[phase] += time.perf_counter() - t0
                yield item


def score(out: ProbeOutput, position: int, confidence: str, engine: Engine) -> Probe:
    """A probe's continuation as a Probe: answer = the box's content, confidence over its answer
    tokens (decoded as a stream, so characters split across tokens stay whole)."""
    decoder = IncrementalDecoder(engine.detokenize, out.token_ids)
    answer, n_answer = probe_answer(decoder)
    lps = tuple(min(0.0, lp) for lp in out.logprobs[:n_answer])
    return Probe(
        position=position,
        confidence=score_probe(lps, confidence),
        answer=answer,
        text=decoder.text,
        token_logprobs=lps,
        probe_tokens=len(out.token_ids),
    )


@dataclass
class _Plan:
    """What a question needs before its session starts: token ids and the reasoning cap."""

    prompt_ids: list[int]
    probe_ids: list[int]
    cap: int


async def _plan(engine: Engine, question: str, prompt: str | None, family: Family, policy: Policy, config: GenerationConfig) -> _Plan:
    if prompt is None:
        prompt = await engine.run_tokenizer(family.build_prompt, engine, question)
    prompt_ids = await engine.run_tokenizer(engine.tokenize, prompt)
    if engine.bos_token_id is not None and (not prompt_ids or prompt_ids[0] != engine.bos_token_id):
        prompt_ids = [engine.bos_token_id, *prompt_ids]
    probe_ids = await engine.run_tokenizer(engine.tokenize, family.probe_prompt)
    caps = [config.max_reasoning_tokens, policy.max_reasoning_tokens, config.max_tokens]
    cap = min(c for c in caps if c is not None)
    if engine.context_window is not None:
        # leave room in the window for a probe, or for the forced answer, after the reasoning
        forced_ids = await engine.run_tokenizer(engine.tokenize, family.forced_answer_text())
        reserve = max(len(probe_ids) + PROBE_MAX_TOKENS, len(forced_ids) + ANSWER_MAX_TOKENS) + 1
        window = engine.context_window
        room = window - len(prompt_ids) - reserve
        if room < 1:
            raise ContextTooLong(
                f"the prompt is {len(prompt_ids)} tokens and leaves no room to reason in the model's "
                f"{window}-token window; shorten the question"
            )
        if config.max_tokens is not None and len(prompt_ids) + config.max_tokens > window:
            # refused, as vLLM and OpenAI refuse it, rather than cut at the window
            raise ContextTooLong(
                f"the prompt is {len(prompt_ids)} tokens and max_tokens asks for {config.max_tokens} more: "
                f"{len(prompt_ids) + config.max_tokens} tokens, more than the model's {window}-token context window "
                f"holds; shorten the prompt or ask for at most {window - len(prompt_ids)} tokens"
            )
        cap = min(cap, room)
    return _Plan(prompt_ids, probe_ids, cap)


async def astream(
    engine: Engine,
    question: str,
    policy: Policy | None = None,
    config: GenerationConfig = GenerationConfig(),
    *,
    family: Family | None = None,
    prompt: str | None = None,
    stop_in_reasoning: bool = False,
    reasoning_only: bool = False,
) -> AsyncGenerator[Event | Result, None]:
    """Answer ``question`` on ``engine`` under ``policy``: yields Events as they happen, then the
    Result (with ``reasoning_only``, the reasoning's: no answer is written, the caller answers).
    ``family`` overrides the one ``config`` names or the engine's detected one; ``prompt``
    (already templated, e.g. a client's conversation) replaces the family's prompt for ``question``.
    The client's stop strings (``config.stop``) end the visible output: a plain family's reasoning
    and any answer; a thinking family's reasoning only with ``stop_in_reasoning`` (a raw
    completion, whose text is the reasoning itself: no thinking block kept apart)."""
    await engine.ready()  # a completions server still starting: a clear 503-style error, not a hang
    if policy is None:
        policy = cast(Policy, Vanilla())
    family = family or get_family(config.family, engine, config.enable_thinking)
    clock = _Clock()
    t_start = time.perf_counter()
    plan = await _plan(engine, question, prompt, family, policy, config)
    session = await clock.timed("prefill", engine.start(plan.prompt_ids, config.sampling, live=config.live_text))
    try:
        # a thinking model's reasoning ends at its think_end; a plain model's is the visible output,
        # and so is a raw completion's (stop_in_reasoning): the client's stop strings end it
        stop_texts = (family.think_end,) if family.thinks else ()
        stops = config.stop if stop_in_reasoning or not family.thinks else ()
        probing = policy.needs_probes or config.always_probe
        # overlapped: the reasoning streams on while a probe runs (server engines; others ignore it)
        run_ahead = probing and config.probe_mode == "overlapped"
        # a policy that never probes needs no steps: one request (or one run) to the end
        rules = replace(config.step_rules(probing=probing), stop_texts=stop_texts, stops=stops)
        tracker = policy.start()
        probes: list[Probe] = []
        reasoning_ids: list[int] = []
        reasoning_text = ""
        spent = {"probe": 0, "probe_prompt": 0}
        last_probe_at = 0
        text_at: dict[int, int] = {}  # reasoning text length at each probe's position (rollback)
        n_steps = 0
        while True:
            step: StepOutput | None = None
            async for item in clock.step("reasoning", session, plan.cap - len(reasoning_ids), rules, run_ahead):
                if isinstance(item, str):
                    yield Event("reasoning", text=item)
                else:
                    step = item
            assert step is not None
            n_steps += 1
            reasoning_ids += step.token_ids
            reasoning_text += step.text
            position = len(reasoning_ids)
            if step.end in ("eos", "stop_text", "stop"):
                # a thinking model that ends its turn inside its thinking (an EOS before its
                # think_end, never kept in the context) is answered as after a stop: _answer
                # closes the thinking. A raw completion's text is the reasoning: it just ends.
                unclosed = step.end == "eos" and family.thinks and not stop_in_reasoning
                stop_reason = "unclosed_thinking" if unclosed else "finished"
                break
            if step.end == "length" or position >= plan.cap:
                stop_reason = _cap_reason(position, policy, config)
                break
            if not probing or position == 0 or position - last_probe_at < max(1, config.probe_interval):
                continue
            out = await clock.timed("probe", session.probe(plan.probe_ids, PROBE_MAX_TOKENS))
            last_probe_at = position
            spent["probe"] += len(out.token_ids)
            spent["probe_prompt"] += out.prompt_tokens
            probe = score(out, position, policy.confidence, engine)
            probes.append(probe)
            text_at[position] = len(reasoning_text)
            yield Event("probe", probe=probe)
            decision = tracker.update(probe)
            if decision.stop:
                stop_reason = decision.reason or "policy"  # a policy that stopped without naming why
                break

        await clock.timed("reasoning", session.halt())  # a stream still running ahead is cancelled now
        reference = None
        if config.always_probe and stop_reason in NOT_EARLY and position > 0:
            out = await clock.timed("probe", _reference_probe(engine, session, plan, family, step))
            spent["probe"] += len(out.token_ids)
            spent["probe_prompt"] += out.prompt_tokens
            reference = score(out, position, policy.confidence, engine)
        yield Event("stop", reason=stop_reason, position=position)
        answer_position, answered_text = position, reasoning_text
        answering = not reasoning_only and config.answer != "none"
        if policy.answer_from == "best" and stop_reason not in MODEL_ENDED and probes and answering:
            # the reference code's rollback: answer from the most confident checkpoint
            answer_position = best_probe(probes).position
            answered_text = reasoning_text[: text_at[answer_position]]
            if answer_position < position:
                await clock.timed("answer", session.rollback(len(plan.prompt_ids) + answer_position))
        answer = _Answer()
        left = config.max_tokens - position if config.max_tokens is not None else None
        if not reasoning_only:
            async for event in _answer(engine, session, family, config, clock, step, stop_reason, answered_text, left, answer):
                yield event
        timings = dict(clock.times)
        timings["total"] = time.perf_counter() - t_start
        yield Result(
            question=question,
            answer=answer.value,
            answer_text=answer.text,
            reasoning_text=reasoning_text,
            stop_reason=stop_reason,
            answer_position=answer_position,
            probes=probes,
            steps=n_steps,
            tokens={"prompt": len(plan.prompt_ids), "reasoning": position, **spent, "answer": answer.tokens,
                    "overrun": session.overrun},
            timings=timings,
            policy=policy_options(policy),
            model=engine.model_name,
            engine=engine.name,
            family=family.name,
            reference=reference,
        )
    finally:
        # shielded both ways, so the session is closed before this returns: an anyio cancel scope
        # (a stopped stream body) cancels every await inside it but not in a shielded scope, and
        # asyncio's Task.cancel stops only the wait, never the close
        closing = asyncio.ensure_future(session.close())
        with _anyio_shield():
            await asyncio.shield(closing)


def _cap_reason(position: int, policy: Policy, config: GenerationConfig) -> str:
    """The stop reason of reasoning that reached a cap: the policy's budget (its own decision), the
    client's ``max_tokens`` (reasoning + answer: nothing is left for an answer), else
    ``max_reasoning_tokens`` (the reasoning's own cap, or the room the context window leaves)."""
    if policy.max_reasoning_tokens is not None and position >= policy.max_reasoning_tokens:
        return "budget"
    if config.max_tokens is not None and position >= config.max_tokens:
        return "max_tokens"
    return "max_reasoning_tokens"


def _anyio_shield() -> Any:
    """A shielded anyio cancel scope, or nothing where anyio is not installed (then no anyio scope
    can be cancelling this task either)."""
    try:
        import anyio
    except ImportError:
        return nullcontext()
    return anyio.CancelScope(shield=True)


async def _reference_probe(engine: Engine, session: Session, plan: _Plan, family: Family, step: StepOutput) -> ProbeOutput:
    """The probe at the end of the full reasoning, on the same context as a boundary's: inside the
    thinking, so a reasoning the model closed itself is probed before its ``think_end`` (cut back,
    probed, then the marker's tokens put back)."""
    marker = 0
    if step.end == "stop_text":  # the step kept the tokens that wrote think_end
        ids = step.token_ids
        while marker < len(ids) and family.think_end in engine.detokenize(ids[: len(ids) - marker]):
            marker += 1
    if not marker:
        return await session.probe(plan.probe_ids, PROBE_MAX_TOKENS)
    try:
        await session.rollback(session.n_tokens - marker)
    except CodestopError:  # a cache that cannot be cut back: probed after the marker instead
        return await session.probe(plan.probe_ids, PROBE_MAX_TOKENS)
    try:
        return await session.probe(plan.probe_ids, PROBE_MAX_TOKENS)
    finally:
        await session.append(step.token_ids[len(step.token_ids) - marker :])


@dataclass
class _Answer:
    text: str = ""
    tokens: int = 0
    value: str | None = None


async def _answer(
    engine: Engine, session: Session, family: Family, config: GenerationConfig, clock: _Clock,
    step: StepOutput, stop_reason: str, reasoning_text: str, left: int | None, answer: _Answer,
) -> AsyncIterator[Event]:
    """The answer after the reasoning, by ``config.answer`` (see GenerationConfig), into ``answer``.
    ``left``: completion tokens still allowed (max_tokens), None for no cap. A thinking left
    unclosed (``unclosed_thinking``) is answered as after a stop: closed, then the box forced
    ("boxed") or the model's own answer ("free")."""

    async def write(prefix: str, max_tokens: int, rules: StepRules) -> AsyncIterator[Event]:
        if left is not None:
            max_tokens = min(max_tokens, left - answer.tokens)
        if max_tokens < 1:
            return
        if prefix:
            yield Event("answer", text=prefix)
            await clock.timed("answer", session.append(await engine.run_tokenizer(engine.tokenize, prefix)))
            answer.text += prefix
        async for item in clock.step("answer", session, max_tokens, rules):
            if isinstance(item, str):
                yield Event("answer", text=item)
            else:
                answer.text += item.text
                answer.tokens += len(item.token_ids)

    free = StepRules(greedy=True, stops=config.stop)
    closed_itself = family.thinks and step.end == "stop_text"
    if closed_itself:
        # the model closed its thinking itself: it writes its own answer, whatever the mode
        async for event in write("", FREE_ANSWER_MAX_TOKENS, free):
            yield event
        answer.value = extract_boxed(answer.text)
    elif stop_reason == "finished" and not family.thinks:
        answer.value = extract_boxed(reasoning_text)  # a plain model's answer is in its output
    if config.answer == "boxed" and answer.value is None:
        # the paper's answer: close the thinking and force the box (a few tokens)
        if closed_itself:
            forced = after(answer.text, "\n\n" + family.answer_prompt)
        elif family.thinks:
            forced = family.forced_answer_text()
        else:
            forced = after(reasoning_text, family.forced_answer_text())
        async for event in write(forced, ANSWER_MAX_TOKENS, StepRules(close_box=True, greedy=True)):
            yield event
        answer.value = _box_content(answer.text)
    elif config.answer == "free" and stop_reason != "finished":
        # codestop ended the thinking: close it and let the model answer in its own words
        prefix = family.close_thinking if family.thinks else after(reasoning_text, "\n\n" + family.answer_prefix)
        async for event in write(prefix, FREE_ANSWER_MAX_TOKENS, free):
            yield event
        answer.value = extract_boxed(answer.text)


def after(text: str, marker: str) -> str:
    """``marker`` as appended after ``text``: the newlines it opens with that ``text`` already ends
    with left out, so the two make one blank line at most, as the family's format has it (a step
    ends at a blank line; the marker opens with one). A thinking family's ``close_thinking`` is
    appended whole: the proxy hides it by its exact text."""
    overlap = min(len(text) - len(text.rstrip("\n")), len(marker) - len(marker.lstrip("\n")))
    return marker[overlap:]


async def agenerate(
    engine: Engine,
    question: str,
    policy: Policy | None = None,
    config: GenerationConfig = GenerationConfig(),
    *,
    on_event: EventCallback | None = None,
    family: Family | None = None,
    prompt: str | None = None,
    stop_in_reasoning: bool = False,
) -> Result:
    """:func:`astream` run to its Result; ``on_event`` sees every event on the way."""
    async with aclosing(astream(engine, question, policy, config, family=family, prompt=prompt,
                                stop_in_reasoning=stop_in_reasoning)) as stream:
        async for item in stream:
            if isinstance(item, Result):
                return item
            if on_event is not None:
                on_event(item)
    raise RuntimeError("astream ended without a Result")  # pragma: no cover - astream always ends with one


def _box_content(answer_text: str) -> str | None:
    """The answer after a forced ``\\boxed{``: the text up to its closing brace."""
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
