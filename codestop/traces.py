"""Traces: full reasoning runs with a probe at every step boundary, and policies replayed on them.

``codestop record`` runs the model to the end with no stopping (the Vanilla policy) and a probe at
every step boundary, storing everything a policy could look at (schema: ``docs/traces.md``).
``codestop replay`` then applies any policy to the stored traces exactly as it would run live: the
same probes, fed in order to ``policy.start().update``, their confidence re-scored from the stored
answer-token log-probabilities with the policy's own confidence function. Milliseconds, no model.

Replay rules (also in docs/traces.md):

* the policy stops at the first probe whose update says stop: ``stop_index`` is that probe's
  0-based index, ``correct`` its ``correct``, ``tokens`` its ``position``;
* a trace on which the policy never stops is scored by its final answer when the trace has one
  (``final_correct``; ``tokens`` = ``reasoning_tokens``, the full reasoning), else by its last probe
  (``tokens`` = the last probe's position); ``stop_index`` and ``stop_reason`` are null;
* ``cost`` = ``tokens`` + the probe tokens the trace carries for the probes up to and including the
  stop (all of them when it never stops), for policies that spend probes (none for vanilla and
  budget, which probe nothing live);
* answer tokens are not counted in replay (a stop's forced answer was never generated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from codestop.confidence import confidence_function
from codestop.datasets import Example, load_examples
from codestop.engines.base import CodestopError
from codestop.evaluate import (
    GenerationOptions,
    RunFile,
    _load_engine,
    _progress,
    add_dataset_options,
    engine_options_from_args,
    generation_from_args,
    read_jsonl,
    run_config,
    run_questions,
)
from codestop.grading import extract_answer, grade
from codestop.policies import Policy, Probe, Vanilla

TRACE_SCHEMA = 1


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


def trace_record(example: Example, result: Any, wall_time: float) -> dict[str, Any]:
    """One trace line (schema 1) from a Vanilla run with a probe at every boundary."""
    base = {"schema": TRACE_SCHEMA, "id": example.id, "dataset": example.dataset, "gold": example.gold, "grading": example.kind}
    if isinstance(result, Exception):
        return {**base, "probes": [], "reasoning_tokens": 0, "finish_reason": "error", "error": str(result),
                "final_answer": None, "final_correct": False, "tokens": {}, "wall_time": round(wall_time, 3)}
    final = result.answer if result.answer is not None else extract_answer(result.answer_text)
    return {
        **base,
        "probes": [
            {
                "position": p.position,
                "confidence": p.confidence,
                "answer": p.answer,
                "correct": grade(p.answer, example.gold, example.kind),
                "tokens": p.tokens,
                "token_logprobs": list(p.token_logprobs or ()),
                "text": p.text,
            }
            for p in result.probes
        ],
        "reasoning_tokens": result.tokens["reasoning"],
        "finish_reason": result.stop_reason,
        "final_answer": final,
        "final_correct": grade(final, example.gold, example.kind),
        "tokens": dict(result.tokens),
        "wall_time": round(wall_time, 3),
    }


def record(
    model: Any,
    dataset: str | None = None,
    *,
    out: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    engine: str | None = None,
    engine_options: dict[str, Any] | None = None,
    generation: GenerationOptions = GenerationOptions(max_new_tokens=1024, probe_interval=1),
    concurrency: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Record traces of ``dataset`` into ``out`` (resumable, like :func:`codestop.evaluate.evaluate`):
    no stopping, a probe at every step boundary at least ``generation.probe_interval`` tokens after
    the last. Returns the traces of the requested questions."""
    from codestop.engines.base import Engine

    examples = load_examples(dataset, data, limit)
    name = examples[0].dataset if examples else (dataset or "")
    policy = Vanilla()
    model_name = model.model_name if isinstance(model, Engine) else model
    engine_name = model.name if isinstance(model, Engine) else engine
    config = run_config("trace", name, model_name, engine_name, policy, generation)
    config["probe_confidence"] = policy.confidence
    run = RunFile.open(out, config)
    wanted = {e.id for e in examples}
    todo = [e for e in examples if e.id not in run.done]
    if todo:
        eng = _load_engine(model, engine, engine_options)
        done = [r for r in run.records if r.get("id") in wanted]
        on_record, close = _progress(len(examples), [{"correct": r.get("final_correct"), "tokens": r.get("tokens")} for r in done], name, progress)

        def show(rec: dict[str, Any]) -> None:
            on_record({"correct": rec.get("final_correct"), "tokens": rec.get("tokens")})

        try:
            run_questions(eng, todo, policy, generation, run, trace_record, concurrency=concurrency,
                          probe_every_boundary=True, on_record=show)
        finally:
            close()
    return [r for r in run.records if r.get("id") in wanted]


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
    try:
        return Probe(
            position=obj["position"],
            confidence=float(obj["confidence"]),
            answer="" if obj["answer"] is None else str(obj["answer"]),
            text=obj.get("text"),
            token_logprobs=tuple(float(x) for x in lps) if isinstance(lps, list) else None,
            tokens=int(obj["tokens"]) if isinstance(obj.get("tokens"), (int, float)) else None,
            correct=bool(obj["correct"]),
        )
    except (ValueError, TypeError) as err:
        raise CodestopError(f"traces: {where}: probe {i}: {err}") from None


def trace_from_json(obj: dict[str, Any], where: str) -> Trace:
    """Validate one trace line (full or minimal)."""
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


def load_traces(path: str | os.PathLike[str]) -> list[Trace]:
    """The traces of a trace file (a cut-short last line is dropped, see :func:`read_jsonl`)."""
    records = read_jsonl(path)
    return [trace_from_json(rec, f"{path}:{n}") for n, rec in enumerate(records, start=1)]


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replayed:
    """A policy's outcome on one trace."""

    id: str
    stop_index: int | None
    stop_reason: str | None
    correct: bool
    tokens: int
    cost: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stop_index": self.stop_index, "stop_reason": self.stop_reason, "correct": self.correct, "tokens": self.tokens}


def rescored(probes: Sequence[Probe], confidence: str) -> list[Probe]:
    """The probes with confidence recomputed from their answer-token log-probabilities by the named
    confidence function (as the live controller would have), where they carry them."""
    fn = confidence_function(confidence)
    out = []
    for p in probes:
        if p.token_logprobs is not None:
            c = min(1.0, max(0.0, fn(tuple(min(0.0, lp) for lp in p.token_logprobs))))
            p = Probe(p.position, c, p.answer, p.text, p.token_logprobs, p.tokens, p.correct)
        out.append(p)
    return out


def replay_trace(trace: Trace, policy: Policy, probes: Sequence[Probe] | None = None) -> Replayed:
    """Apply ``policy`` to one trace under the rules in this module's docstring. ``probes``: the
    trace's probes already re-scored for this policy (saves the work in sweeps)."""
    probes = rescored(trace.probes, policy.confidence) if probes is None else probes
    tracker = policy.start()
    spent = 0
    for i, p in enumerate(probes):
        spent += p.tokens or 0
        decision = tracker.update(p)
        if decision.stop:
            cost = p.position + (spent if policy.needs_probes else 0)
            return Replayed(trace.id, i, decision.reason, bool(p.correct), p.position, cost)
    if trace.final_correct is not None:
        correct = trace.final_correct
        tokens = trace.reasoning_tokens if trace.reasoning_tokens is not None else (probes[-1].position if probes else 0)
    else:
        correct = bool(probes[-1].correct)
        tokens = probes[-1].position
    return Replayed(trace.id, None, None, correct, tokens, tokens + (spent if policy.needs_probes else 0))


def summarize_replay(rows: Sequence[Replayed]) -> dict[str, Any]:
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(r.correct for r in rows) / n if n else 0.0,
        "mean_tokens": sum(r.tokens for r in rows) / n if n else 0.0,
        "mean_cost": sum(r.cost for r in rows) / n if n else 0.0,
    }


def replay(traces: Sequence[Trace] | str | os.PathLike[str], policy: Policy) -> dict[str, Any]:
    """``{"summary": {n, accuracy, mean_tokens, mean_cost}, "traces": [{id, stop_index, stop_reason,
    correct, tokens}]}`` for ``policy`` on ``traces`` (a list or a trace file)."""
    if isinstance(traces, (str, os.PathLike)):
        traces = load_traces(traces)
    rows = [replay_trace(t, policy) for t in traces]
    return {"summary": summarize_replay(rows), "traces": [r.to_json() for r in rows]}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    from codestop.cli import add_generation_options, add_model_options, add_policy_options

    p = sub.add_parser(
        "record",
        help="record traces: run to the end with a probe at every step boundary (for replay, sweep, calibrate)",
        description="Run the model on a benchmark with no stopping and a probe at every step boundary, "
        "one trace (JSON line, schema 1, see docs/traces.md) per question; re-running resumes.",
    )
    add_dataset_options(p)
    p.add_argument("--out", required=True, help="the trace file (JSON lines); re-running resumes it")
    add_model_options(p)
    add_generation_options(p)
    # a recording must end: a cap that fits small models, and a probe at every boundary
    p.set_defaults(func=cmd_record, max_new_tokens=1024, probe_interval=1)

    r = sub.add_parser(
        "replay",
        help="apply a stopping policy to recorded traces, in milliseconds",
        description="Apply a stopping policy to recorded traces exactly as it would run live.",
    )
    r.add_argument("traces", help="a trace file (codestop record, or minimal traces: id and probes)")
    r.add_argument("--json", action="store_true", help="print one JSON object: summary and per-trace outcome")
    add_policy_options(r)
    r.set_defaults(func=cmd_replay)


def cmd_record(args: argparse.Namespace) -> int:
    if args.dataset is None and args.data is None:
        raise CodestopError("dataset: give --dataset or --data PATH")
    if args.model is None:
        from codestop.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    t0 = time.perf_counter()
    traces = record(
        args.model, args.dataset, out=args.out, data=args.data, limit=args.limit, engine=args.engine,
        engine_options=engine_options_from_args(args), generation=generation_from_args(args),
        concurrency=args.concurrency, progress=True,
    )
    n = len(traces)
    acc = sum(bool(t.get("final_correct")) for t in traces) / n if n else 0.0
    probes = sum(len(t.get("probes", ())) for t in traces) / n if n else 0.0
    length = sum(int(t.get("reasoning_tokens", 0)) for t in traces) / n if n else 0.0
    print(f"{n} traces in {args.out}: final accuracy {acc * 100:.1f}%, {length:.0f} reasoning tokens and "
          f"{probes:.1f} probes per question ({time.perf_counter() - t0:.0f} s this session)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from codestop.cli import policy_from_args

    policy = policy_from_args(args)
    t0 = time.perf_counter()
    result = replay(args.traces, policy)
    if args.json:
        print(json.dumps(result))
        return 0
    s = result["summary"]
    stops: dict[str, int] = {}
    for t in result["traces"]:
        stops[t["stop_reason"] or "never"] = stops.get(t["stop_reason"] or "never", 0) + 1
    print(
        f"{policy.name} on {s['n']} traces: accuracy {s['accuracy'] * 100:.1f}%, mean tokens {s['mean_tokens']:.0f}, "
        f"mean cost {s['mean_cost']:.0f} (incl. probes); stops: "
        + ", ".join(f"{k} {v}" for k, v in sorted(stops.items()))
        + f" ({(time.perf_counter() - t0) * 1000:.0f} ms)",
        file=sys.stdout,
    )
    return 0

