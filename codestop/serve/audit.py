"""Audits (``codestop serve --audit-fraction F``): whether a stop changed the answer, measured on a
seeded uniform sample of the requests served under a stopping policy, after their clients have
their answers.

Which requests: each request served under the guarded policy is drawn with probability ``F``
(``random.Random(seed)``, in the order requests arrive, as shadow mode draws). A drawn request
that the policy did not stop early counts as an audit whose answer did not change, at no cost
(nothing was cut: calibration scores such a trace the same way). A drawn request that stopped
early is continued in the background once its client has the answer: the prompt plus the
reasoning up to the stop, resumed on the engine (no stopping, a probe at every boundary, as
shadow mode runs) to its natural end or the request's cap, then the reference probe there
(:func:`codestop.controller.astream` does all of it). The live probes up to the stop and the
continuation's probes after it make one trace line, written by the one writer
(:func:`codestop.traces.trace_line`) and marked ``config.kind == "audit"``; ``changed`` is what
calibration would compute on it: the served policy replayed on the trace
(:func:`codestop.replay.replay_trace`), the answer at its stop compared with the reference.

Audits run below live traffic by a concurrency bound: at most ``AUDIT_CONCURRENCY`` at a time per
process, at most ``AUDIT_BACKLOG`` waiting; a draw past the backlog, and an audit that fails (the
upstream gone, the context full), is counted as failed and never retried: the sample stays the
draw's, and the live traffic never waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

from codestop.config import GenerationConfig
from codestop.controller import Event, Result, astream
from codestop.errors import CodestopError
from codestop.policies import NOT_EARLY, Policy, Probe, best_probe, policy_options
from codestop.replay import changed_from_reference, replay_trace
from codestop.serve.serving import result_of
from codestop.serve.shadow import SHADOW_POLICY, Shadow
from codestop.traces import TRACE_SCHEMA, trace_from_json, trace_line
from codestop.version import __version__

if TYPE_CHECKING:
    from codestop.engines.base import Engine
    from codestop.serve.serving import Prepared

log = logging.getLogger("codestop.serve")

AUDIT_CONCURRENCY = 1  # audits running at once, per process: live requests keep the upstream's other places
AUDIT_BACKLOG = 32  # audits waiting for a place; a draw past it is counted as failed


@dataclass(frozen=True)
class AuditOutcome:
    """One audit: ``changed`` (the answer at the stop differs from the full reasoning's), whether the
    request had ``stopped`` early at all (False: counted unchanged at no cost), the ``cost_tokens``
    the audit spent, the ``saved_cost_tokens`` the stop saved (the full run's replayed cost minus
    the served policy's), and the audit's trace ``line`` (None for a request not stopped early)."""

    segment: str
    changed: bool
    stopped: bool
    cost_tokens: int = 0
    saved_cost_tokens: int = 0
    line: dict[str, Any] | None = None


def continuation_config(config: GenerationConfig, position: int) -> GenerationConfig | None:
    """The continuation's config: the request's, run as shadow mode runs it (a probe at every
    boundary, nothing appended, no answer), capped where the request was: its reasoning cap and
    ``max_tokens`` less the ``position`` already reasoned. None: nothing is left to reason."""
    left = min(c for c in (config.max_reasoning_tokens, config.max_tokens) if c is not None) - position
    if left < 1:
        return None
    return Shadow.config(config).replace(max_reasoning_tokens=left, max_tokens=None, live_text=False)


def joined(served: Result, rest: Result) -> Result:
    """The served run up to its stop and the continuation after it as one run: the continuation's
    probes and reference moved to the positions of the whole reasoning. A continuation that reasons
    no further (the model ended right at the stop) has the stop's own probe as its reference."""
    offset = served.tokens["reasoning"]

    def moved(p: Probe) -> Probe:
        return replace(p, position=p.position + offset)

    reference = moved(rest.reference) if rest.reference is not None else None
    if reference is None and rest.tokens["reasoning"] == 0 and served.probes:
        reference = served.probes[-1]
    tokens = {k: served.tokens.get(k, 0) + rest.tokens.get(k, 0) for k in ("reasoning", "probe", "probe_prompt", "overrun")}
    return replace(rest, question=served.question, answer=None, answer_text="", reasoning_text=served.reasoning_text + rest.reasoning_text,
                   probes=[*served.probes, *(moved(p) for p in rest.probes)], reference=reference,
                   steps=served.steps + rest.steps, tokens={"prompt": served.tokens["prompt"], **tokens, "answer": 0},
                   policy=served.policy)


def audit_line(whole: Result, prep: Prepared, policy: Policy, segment: str, config: GenerationConfig, wall_time: float) -> dict[str, Any]:
    """The audit's trace line: the shadow format (docs/traces.md), unlabelled, ``config.kind`` "audit"."""
    line = trace_line(whole, id=prep.rid, dataset="audit", wall_time=wall_time, probe_text=False)
    return {**line, "config": {"kind": "audit", "schema": TRACE_SCHEMA, "segment": segment, "model": whole.model,
                               "engine": whole.engine, "family": whole.family, "policy": policy_options(policy),
                               "generation": config.to_dict(), "probe_confidence": policy.confidence,
                               "codestop_version": __version__}}


def judged(line: dict[str, Any], served: Result, policy: Policy) -> tuple[bool, int]:
    """``changed`` as calibration computes it on the audit's trace (the served policy replayed on
    it; where the replay does not stop, the live stop's answer against the reference), and the cost
    tokens the stop saved against the full run (both replayed)."""
    trace = trace_from_json(line, f"audit {line['id']}")
    stop = replay_trace(trace, policy)
    if stop.stop_index is not None:
        changed = stop.changed
    else:
        answer = (best_probe(served.probes) if policy.answer_from == "best" else served.probes[-1]).answer if served.probes else served.answer
        changed = changed_from_reference(trace, answer)
    if changed is None:
        raise CodestopError("audit: the continuation left no reference answer to compare with")
    full = replay_trace(trace, SHADOW_POLICY)
    return bool(changed), max(0, full.cost_tokens - stop.cost_tokens)


class Auditor:
    """The draw of audited requests and the audits running in the background: each outcome goes to
    ``on_outcome``, each failure (by segment) to ``on_failure``."""

    def __init__(self, fraction: float, on_outcome: Callable[[AuditOutcome], None], on_failure: Callable[[str], None],
                 seed: int = 1) -> None:
        self.fraction = float(fraction)
        self.on_outcome, self.on_failure = on_outcome, on_failure
        self._draw = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._places: asyncio.Semaphore | None = None  # made in the serving loop

    def chosen(self) -> bool:
        """Whether the next request served under the policy is audited."""
        return self.fraction > 0 and (self.fraction >= 1 or self._draw.random() < self.fraction)

    def start(self, engine: Engine, prep: Prepared, served: Result, policy: Policy, segment: str) -> None:
        """Audit ``served`` (the answer its client has now): at once when it did not stop early,
        else in the background."""
        if served.stop_reason in NOT_EARLY:
            self._report(AuditOutcome(segment, changed=False, stopped=False))
            return
        if len(self._tasks) >= AUDIT_BACKLOG:
            log.warning("audit: %d audits already waiting; the audit of %s is dropped (counted as failed)", len(self._tasks), prep.rid)
            self._failed(segment)
            return
        task = asyncio.get_running_loop().create_task(self._audit(engine, prep, served, policy, segment))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _audit(self, engine: Engine, prep: Prepared, served: Result, policy: Policy, segment: str) -> None:
        if self._places is None:
            self._places = asyncio.Semaphore(AUDIT_CONCURRENCY)
        async with self._places:
            t0 = time.perf_counter()
            try:
                config = continuation_config(prep.config, served.tokens["reasoning"])
                if config is None:
                    raise CodestopError("audit: the request's cap leaves nothing to continue")
                stream = cast(AsyncGenerator[Event | Result, None], astream(
                    engine, prep.question, SHADOW_POLICY, config, family=prep.family, prompt=prep.prompt + served.reasoning_text,
                    stop_in_reasoning=not prep.chat, reasoning_only=True))
                rest = await result_of(stream)
                line = audit_line(joined(served, rest), prep, policy, segment, config, time.perf_counter() - t0)
                changed, saved = judged(line, served, policy)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # counted, never retried
                log.warning("audit: the audit of %s failed (%s); counted, not retried", prep.rid, err)
                self._failed(segment)
                return
        self._report(AuditOutcome(segment, changed, True, rest.cost_tokens, saved, line))

    def _report(self, outcome: AuditOutcome) -> None:
        try:
            self.on_outcome(outcome)
        except Exception:
            log.exception("audit: the outcome for segment %s could not be recorded", outcome.segment)

    def _failed(self, segment: str) -> None:
        try:
            self.on_failure(segment)
        except Exception:
            log.exception("audit: a failure for segment %s could not be recorded", segment)

    async def aclose(self) -> None:
        """Cancel the audits still running (the server is stopping: the engine is about to close)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def busy(self) -> bool:
        """Whether an audit is running or waiting."""
        return bool(self._tasks)
