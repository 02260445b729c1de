"""Replay: a stopping policy applied to recorded traces, exactly as it would run live. No model.

``codestop record`` (:mod:`codestop.eval.runner`) runs the model to the end with no stopping and a
probe at every step boundary, storing everything a policy could look at (schema:
``docs/traces.md``, loaded by :mod:`codestop.traces`). ``codestop replay`` then feeds the stored probes, in order, to
``policy.start().update``, their confidence re-scored from the stored answer-token
log-probabilities with :func:`codestop.confidence.score_probe` and the policy's own confidence
function, as live generation scores them. Milliseconds; no engine is imported.

Replay rules (also in docs/traces.md):

* with ``answer_from="best"`` a stop is scored by the most confident probe up to it (the reasoning
  cut back there), its cost still counted to the stop;
* the policy stops at the first probe whose update says stop: ``stop_index`` is that probe's
  0-based index, ``answer`` and ``correct`` its ``answer`` and ``correct``, ``reasoning_tokens`` its
  ``position``; ``changed``: whether that answer differs from the trace's ``reference_answer`` (the
  full reasoning's), compared as the trace's ``grading`` compares answers
  (:func:`codestop.grading.same_answer`); null when the trace has no reference;
* a trace on which the policy never stops is scored by its final answer when the trace has one
  (``final_answer``, ``final_correct``; ``reasoning_tokens`` = the trace's ``reasoning_tokens``, the
  full reasoning), else by its last probe (``reasoning_tokens`` = the last probe's position);
  ``stop_index`` and ``stop_reason`` are null, ``changed`` is false (nothing was cut);
* ``correct`` is null on unlabelled traces (no gold, e.g. the proxy's shadow traces), and so is a
  summary's accuracy;
* ``cost_tokens`` = :func:`codestop.controller.cost_tokens` of ``reasoning_tokens`` and the
  ``probe_tokens`` of the probes up to and including the stop (all of them when it never stops),
  for policies that spend probes (none for vanilla and budget, which probe nothing live);
* answer and overrun tokens are not counted in replay (a stop's forced answer was never generated,
  a recording probes sequentially; docs/vocabulary.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from codestop.confidence import score_probe
from codestop.controller import cost_tokens
from codestop.policies import Policy, Probe, best_probe
from codestop.traces import Trace, load_traces, thinned


@dataclass(frozen=True)
class Replayed:
    """A policy's outcome on one trace: reasoning tokens at the stop, and cost tokens (those plus the
    probe tokens spent up to it)."""

    id: str
    stop_index: int | None
    stop_reason: str | None
    correct: bool | None  # None: an unlabelled trace
    reasoning_tokens: int
    cost_tokens: int
    answer: str | None = None  # the answer given: at the stop, else the full reasoning's
    changed: bool | None = None  # the answer at the stop differs from the reference (None: no reference)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stop_index": self.stop_index, "stop_reason": self.stop_reason, "answer": self.answer,
                "correct": self.correct, "changed": self.changed, "reasoning_tokens": self.reasoning_tokens,
                "cost_tokens": self.cost_tokens}


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
            answered = best_probe(probes[: i + 1]) if policy.answer_from == "best" else p
            return Replayed(trace.id, i, decision.reason, answered.correct, p.position, _cost(p.position, spent, policy),
                            answered.answer, changed_from_reference(trace, answered.answer))
    if trace.ended:  # labelled or not
        correct, answer = trace.final_correct, trace.final_answer
        tokens = trace.reasoning_tokens if trace.reasoning_tokens is not None else (probes[-1].position if probes else 0)
    else:
        correct, answer = probes[-1].correct, probes[-1].answer
        tokens = probes[-1].position
    return Replayed(trace.id, None, None, correct, tokens, _cost(tokens, spent, policy), answer, False)


def changed_from_reference(trace: Trace, answer: str | None) -> bool | None:
    """Whether ``answer`` differs from the trace's reference answer (None when it has none)."""
    if trace.reference_answer is None:
        return None
    from codestop.grading import same_answer  # math traces start a math-verify worker on first use

    return not same_answer(answer, trace.reference_answer, trace.grading)


def _cost(reasoning: int, probe: int, policy: Policy) -> int:
    """What replay can count of the cost: the reasoning, and the probes where the policy spends them."""
    return cost_tokens({"reasoning": reasoning, "probe": probe if policy.needs_probes else 0})


def summarize_replay(rows: Sequence[Replayed]) -> dict[str, Any]:
    """Accuracy (a fraction; null when a trace is unlabelled), mean reasoning tokens and mean cost
    tokens over the replayed traces."""
    n = len(rows)
    labelled = all(r.correct is not None for r in rows)
    return {
        "n": n,
        "accuracy": (sum(bool(r.correct) for r in rows) / n if n else 0.0) if labelled else None,
        "mean_reasoning_tokens": sum(r.reasoning_tokens for r in rows) / n if n else 0.0,
        "mean_cost_tokens": sum(r.cost_tokens for r in rows) / n if n else 0.0,
    }


def replay(traces: Sequence[Trace] | str | os.PathLike[str], policy: Policy, probe_interval: int | None = None) -> dict[str, Any]:
    """``{"summary": {n, accuracy, mean_reasoning_tokens, mean_cost_tokens}, "traces": [{id, stop_index,
    stop_reason, answer, correct, changed, reasoning_tokens, cost_tokens}]}`` for ``policy`` on ``traces`` (a list or a trace file), thinned
    to ``probe_interval`` when given."""
    if isinstance(traces, (str, os.PathLike)):
        traces = load_traces(traces)
    if probe_interval is not None:
        traces = [thinned(t, probe_interval) for t in traces]
    rows = [replay_trace(t, policy) for t in traces]
    return {"summary": summarize_replay(rows), "traces": [r.to_json() for r in rows]}
