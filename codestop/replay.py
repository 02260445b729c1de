"""Replay: a stopping policy applied to recorded traces, exactly as it would run live. No model.

``codestop record`` (:mod:`codestop.evaluate`) runs the model to the end with no stopping and a
probe at every step boundary, storing everything a policy could look at (schema:
``docs/traces.md``). ``codestop replay`` then feeds the stored probes, in order, to
``policy.start().update``, their confidence re-scored from the stored answer-token
log-probabilities with :func:`codestop.confidence.score_probe` and the policy's own confidence
function, as live generation scores them. Milliseconds; this module imports no engine.

Replay rules (also in docs/traces.md):

* with ``answer_from="best"`` a stop is scored by the most confident probe up to it (the reasoning
  cut back there), its cost still counted to the stop;
* the policy stops at the first probe whose update says stop: ``stop_index`` is that probe's
  0-based index, ``correct`` its ``correct``, ``reasoning_tokens`` its ``position``;
* a trace on which the policy never stops is scored by its final answer when the trace has one
  (``final_correct``; ``reasoning_tokens`` = the trace's ``reasoning_tokens``, the full reasoning),
  else by its last probe (``reasoning_tokens`` = the last probe's position); ``stop_index`` and
  ``stop_reason`` are null;
* ``cost`` = ``reasoning_tokens`` + the ``probe_tokens`` of the probes up to and including the stop
  (all of them when it never stops), for policies that spend probes (none for vanilla and budget,
  which probe nothing live);
* answer tokens are not counted in replay (a stop's forced answer was never generated).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from codestop.confidence import score_probe
from codestop.errors import CodestopError
from codestop.jsonl import read_numbered
from codestop.policies import Policy, Probe, best_probe

TRACE_SCHEMA = 1


# --------------------------------------------------------------------------------------------
# Loading traces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """A trace as replay needs it: its probes (``correct`` set on each), and the final answer's
    correctness and full reasoning length when the trace has them."""

    id: str
    probes: tuple[Probe, ...]
    final_correct: bool | None = None
    reasoning_tokens: int | None = None


def _probe_from_json(obj: Any, where: str, i: int) -> Probe:
    if not isinstance(obj, dict):
        raise CodestopError(f"traces: {where}: probe {i} is not an object")
    for key in ("position", "confidence", "answer", "correct"):
        if key not in obj:
            raise CodestopError(f"traces: {where}: probe {i} has no {key!r} (a probe needs position, confidence, answer, correct)")
    lps = obj.get("token_logprobs")
    spent = obj.get("probe_tokens", obj.get("tokens"))  # "tokens": traces written before the rename
    try:
        return Probe(
            position=obj["position"],
            confidence=float(obj["confidence"]),
            answer="" if obj["answer"] is None else str(obj["answer"]),
            text=obj.get("text"),
            token_logprobs=tuple(float(x) for x in lps) if isinstance(lps, list) else None,
            probe_tokens=int(spent) if isinstance(spent, (int, float)) and not isinstance(spent, bool) else None,
            correct=bool(obj["correct"]),
        )
    except (ValueError, TypeError) as err:
        raise CodestopError(f"traces: {where}: probe {i}: {err}") from None


def trace_from_json(obj: dict[str, Any], where: str) -> Trace:
    """Validate one trace line (full or minimal); ``where`` (file:line) names it in errors."""
    if "id" not in obj:
        raise CodestopError(f"traces: {where}: no 'id'")
    schema = obj.get("schema", TRACE_SCHEMA)
    if schema != TRACE_SCHEMA:
        raise CodestopError(f"traces: {where}: schema {schema!r} is not one this codestop reads ({TRACE_SCHEMA})")
    probes_json = obj.get("probes")
    if not isinstance(probes_json, list):
        raise CodestopError(f"traces: {where}: no 'probes' list")
    probes = tuple(_probe_from_json(p, where, i) for i, p in enumerate(probes_json))
    for i in range(1, len(probes)):
        if probes[i].position < probes[i - 1].position:
            raise CodestopError(f"traces: {where}: probe {i} position {probes[i].position} goes backwards")
    final = obj.get("final_correct")
    reasoning = obj.get("reasoning_tokens")
    if not probes and final is None:
        raise CodestopError(f"traces: {where}: no probes and no final answer: nothing to score")
    return Trace(
        id=str(obj["id"]),
        probes=probes,
        final_correct=bool(final) if final is not None else None,
        reasoning_tokens=int(reasoning) if isinstance(reasoning, (int, float)) and final is not None else None,
    )


def thinned(trace: Trace, probe_interval: int) -> Trace:
    """The trace as a live run with ``probe_interval`` would have probed it: a recorded probe is
    kept when at least ``probe_interval`` reasoning tokens passed since the last kept one (the
    controller's rule), so a trace recorded at every boundary stands for any larger interval. A
    trace with no final answer keeps its last probe, which stands for it (the replay rules)."""
    kept: list[Probe] = []
    last = 0
    for p in trace.probes:
        if p.position > 0 and p.position - last >= max(1, probe_interval):
            kept.append(p)
            last = p.position
    if trace.final_correct is None and trace.probes and (not kept or kept[-1] is not trace.probes[-1]):
        kept.append(trace.probes[-1])
    return replace(trace, probes=tuple(kept))


def load_traces(path: str | os.PathLike[str], probe_interval: int | None = None) -> list[Trace]:
    """The traces of a trace file (each :func:`thinned` to ``probe_interval`` when given). A
    cut-short last line is dropped with a warning on stderr; a file with no trace at all is an
    error (a replay of nothing would report nothing quietly)."""
    if probe_interval is not None and probe_interval < 1:
        raise CodestopError(f"probe_interval: {probe_interval!r} must be >= 1")
    records = read_numbered(path)
    if not records:
        raise CodestopError(f"traces: no traces in {path}; record some with `codestop record`")
    traces = [trace_from_json(rec, f"{path}:{n}") for n, rec in records]
    return traces if probe_interval is None else [thinned(t, probe_interval) for t in traces]


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replayed:
    """A policy's outcome on one trace: reasoning tokens at the stop, and cost (those plus the probe
    tokens spent up to it)."""

    id: str
    stop_index: int | None
    stop_reason: str | None
    correct: bool
    reasoning_tokens: int
    cost: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stop_index": self.stop_index, "stop_reason": self.stop_reason, "correct": self.correct,
                "reasoning_tokens": self.reasoning_tokens}


def rescored(probes: Sequence[Probe], confidence: str) -> list[Probe]:
    """The probes with confidence recomputed from their answer-token log-probabilities by the named
    confidence function (with the same function live generation uses), where they carry them."""
    return [
        p if p.token_logprobs is None else replace(p, confidence=score_probe(p.token_logprobs, confidence))
        for p in probes
    ]


def replay_trace(trace: Trace, policy: Policy, probes: Sequence[Probe] | None = None) -> Replayed:
    """Apply ``policy`` to one trace under the rules in this module's docstring. ``probes``: the
    trace's probes already re-scored for this policy (saves the work in sweeps)."""
    probes = rescored(trace.probes, policy.confidence) if probes is None else probes
    tracker = policy.start()
    spent = 0
    for i, p in enumerate(probes):
        spent += p.probe_tokens or 0
        decision = tracker.update(p)
        if decision.stop:
            cost = p.position + (spent if policy.needs_probes else 0)
            answered = best_probe(probes[: i + 1]) if policy.answer_from == "best" else p
            return Replayed(trace.id, i, decision.reason, bool(answered.correct), p.position, cost)
    if trace.final_correct is not None:
        correct = trace.final_correct
        tokens = trace.reasoning_tokens if trace.reasoning_tokens is not None else (probes[-1].position if probes else 0)
    else:
        correct = bool(probes[-1].correct)
        tokens = probes[-1].position
    return Replayed(trace.id, None, None, correct, tokens, tokens + (spent if policy.needs_probes else 0))


def summarize_replay(rows: Sequence[Replayed]) -> dict[str, Any]:
    """Accuracy (a fraction), mean reasoning tokens and mean cost over the replayed traces."""
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(r.correct for r in rows) / n if n else 0.0,
        "mean_tokens": sum(r.reasoning_tokens for r in rows) / n if n else 0.0,
        "mean_cost": sum(r.cost for r in rows) / n if n else 0.0,
    }


def replay(traces: Sequence[Trace] | str | os.PathLike[str], policy: Policy, probe_interval: int | None = None) -> dict[str, Any]:
    """``{"summary": {n, accuracy, mean_tokens, mean_cost}, "traces": [{id, stop_index, stop_reason,
    correct, reasoning_tokens}]}`` for ``policy`` on ``traces`` (a list or a trace file), thinned
    to ``probe_interval`` when given."""
    if isinstance(traces, (str, os.PathLike)):
        traces = load_traces(traces)
    if probe_interval is not None:
        traces = [thinned(t, probe_interval) for t in traces]
    rows = [replay_trace(t, policy) for t in traces]
    return {"summary": summarize_replay(rows), "traces": [r.to_json() for r in rows]}
