"""Traces: the recorded questions that replay, sweeps, calibration and figures read without the model.

One JSON line per question (schema 1, ``docs/traces.md``): every probe with its position,
confidence, answer, correctness and answer-token log-probabilities, and the final answer's
correctness and full reasoning length. :func:`trace_line` writes them (for ``codestop record``,
the proxy's shadow mode, and whatever else records a run); :func:`load_traces` reads and validates
them (minimal traces, only ``id`` and ``probes``, too; from one file or several, paths and globs), optionally :func:`thinned` to a larger
probe interval. Engine-free.

The stop reason is ``stop_reason`` (as in results and eval lines); traces written before that name
call it ``finish_reason``: both are read, and for one release both are written.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from codestop.errors import CodestopError
from codestop.grading import GradeKind, extract_answer, grade
from codestop.jsonl import read_numbered
from codestop.policies import Probe

if TYPE_CHECKING:
    from codestop.controller import Result

TRACE_SCHEMA = 1


@dataclass(frozen=True)
class Trace:
    """A trace as replay needs it: its probes (``correct`` set on each when the trace is labelled,
    None on unlabelled traces such as the proxy's shadow traces), and the final answer's correctness
    and full reasoning length when the trace has them.

    ``reference_answer`` is what the full reasoning answers, the reference of the label-free risk
    ``changed``: the answer of the trace's ``reference`` probe (the same probe as at every boundary,
    taken at the end of the full reasoning, so both answers are read alike) when it has one, else its
    ``final_answer``. ``grading`` says how two answers are compared (``integer``, ``math``, ``choice``).
    ``stop_reason``: why the full reasoning ended (``finished``, ``max_reasoning_tokens``, ...), when
    the line says."""

    id: str
    probes: tuple[Probe, ...]
    final_correct: bool | None = None
    reasoning_tokens: int | None = None
    final_answer: str | None = None
    reference_answer: str | None = None
    grading: str | None = None
    stop_reason: str | None = None

    @property
    def ended(self) -> bool:
        """Whether the trace ran to the end of its reasoning: it has a final answer (graded or not)
        or a reference probe, which is taken there (``reference_answer`` is either's)."""
        return self.final_correct is not None or self.reference_answer is not None

    @property
    def labelled(self) -> bool:
        """Whether every probe, and the final answer when there is one, carries ``correct`` (a sweep
        and the risk ``lost`` need it; a minimal trace of probes alone has no final answer)."""
        return all(p.correct is not None for p in self.probes) and not (self.final_correct is None and self.final_answer is not None)


def _probe_from_json(obj: Any, where: str, i: int) -> Probe:
    if not isinstance(obj, dict):
        raise CodestopError(f"traces: {where}: probe {i} is not an object")
    for key in ("position", "confidence", "answer"):
        if key not in obj:
            raise CodestopError(f"traces: {where}: probe {i} has no {key!r} (a probe needs position, confidence, answer; "
                                "correct when labelled)")
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
            correct=None if obj.get("correct") is None else bool(obj["correct"]),
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
    final_answer = obj.get("final_answer")
    reasoning = obj.get("reasoning_tokens")
    reference = obj.get("reference")
    if not probes and final is None and final_answer is None and reference is None:
        raise CodestopError(f"traces: {where}: no probes and no final answer: nothing to score")
    reference_probe = _probe_from_json(reference, where, -1) if reference is not None else None
    if reference_probe is not None:
        reference_answer: str | None = reference_probe.answer
    else:
        reference_answer = None if final_answer is None else str(final_answer)
    ended = final is not None or reference_answer is not None  # as Trace.ended: it ran to the end of its reasoning
    return Trace(
        id=str(obj["id"]),
        probes=probes,
        final_correct=bool(final) if final is not None else None,
        reasoning_tokens=int(reasoning) if isinstance(reasoning, (int, float)) and ended else None,
        final_answer=None if final_answer is None else str(final_answer),
        reference_answer=reference_answer,
        grading=obj.get("grading") if isinstance(obj.get("grading"), str) else None,
        stop_reason=stop_reason(obj),
    )


def stop_reason(line: dict[str, Any]) -> str | None:
    """A trace line's stop reason: ``stop_reason``, or ``finish_reason`` in lines written before that name."""
    reason = line.get("stop_reason", line.get("finish_reason"))
    return reason if isinstance(reason, str) else None


# --------------------------------------------------------------------------------------------
# Writing: the one writer of trace lines
# --------------------------------------------------------------------------------------------


def probe_line(probe: Probe, correct: bool | None, text: bool = True) -> dict[str, Any]:
    """One probe of a trace line; ``text``: with the raw probe continuation."""
    line = {"position": probe.position, "confidence": probe.confidence, "answer": probe.answer, "correct": correct,
            "probe_tokens": probe.probe_tokens, "token_logprobs": list(probe.token_logprobs or ())}
    return {**line, "text": probe.text} if text else line


def final_answer(result: Result) -> str | None:
    """What the full reasoning answered: the controller's answer, else the one read from the answer text."""
    return result.answer if result.answer is not None else extract_answer(result.answer_text)


def trace_line(result: Result | Exception, *, id: str, dataset: str, wall_time: float, gold: str | None = None,
               grading: GradeKind | None = None, probe_text: bool = True, texts: dict[str, str] | None = None) -> dict[str, Any]:
    """One trace line (schema 1, docs/traces.md) of a run with no stopping and a probe at every
    boundary, and its ``reference`` probe at the end of the full reasoning. With a ``gold`` every
    probe's and the final answer's ``correct`` is graded as ``grading`` grades; without one the line
    is unlabelled (every ``correct`` null). ``result`` an exception (the question did not fit): an
    error line, so a resumed run does not retry it. ``probe_text``: each probe's raw continuation;
    ``texts``: more text fields (the proxy's prompt, reasoning and answer text), placed before the counts."""
    def correct(answer: str | None) -> bool | None:
        return None if gold is None else grade(answer, gold, grading or "math")

    head = {"schema": TRACE_SCHEMA, "id": id, "dataset": dataset, "gold": gold, "grading": grading}
    if isinstance(result, Exception):
        return {**head, "probes": [], "reasoning_tokens": 0, **_stopped("error"), "error": str(result),
                "final_answer": None, "final_correct": None if gold is None else False, "tokens": {}, "wall_time": round(wall_time, 3)}
    final = final_answer(result)
    reference = result.reference
    return {
        **head,
        "probes": [probe_line(p, correct(p.answer), probe_text) for p in result.probes],
        "reasoning_tokens": result.tokens["reasoning"],
        **_stopped(result.stop_reason),
        "final_answer": final,
        "final_correct": correct(final),
        **({"reference": probe_line(reference, correct(reference.answer), probe_text)} if reference is not None else {}),
        **(texts or {}),
        "tokens": dict(result.tokens),
        "wall_time": round(wall_time, 3),
    }


def _stopped(reason: str) -> dict[str, str]:
    """The stop reason under its name, and (for one release) under the name traces used before it."""
    return {"stop_reason": reason, "finish_reason": reason}


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
    if not trace.ended and trace.probes and (not kept or kept[-1] is not trace.probes[-1]):
        kept.append(trace.probes[-1])
    return replace(trace, probes=tuple(kept))


def trace_files(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The files ``paths`` names: one path or several, each a file or a glob pattern (``hosts/*/shadow.jsonl``),
    in the order given (a glob's matches sorted), each file once however many patterns name it. A
    pattern that matches nothing is an error (a missing host's traces would drop out quietly)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise CodestopError("traces: no trace file given")
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        matched = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matched:
            raise CodestopError(f"traces: {text!r} matches no file")
        out += [m for m in matched if m not in out]
    return out


def load_traces(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                probe_interval: int | None = None) -> list[Trace]:
    """The traces of one trace file or several (:func:`trace_files`: paths and glob patterns; traces
    from several proxy hosts calibrate together), in file order, each :func:`thinned` to
    ``probe_interval`` when given. A cut-short last line is dropped with a warning on stderr; a file
    with no trace at all is an error (a replay of nothing would report nothing quietly)."""
    if probe_interval is not None and probe_interval < 1:
        raise CodestopError(f"probe_interval: {probe_interval!r} must be >= 1")
    traces: list[Trace] = []
    for path in trace_files(paths):
        records = read_numbered(path)
        if not records:
            raise CodestopError(f"traces: no traces in {path}; record some with `codestop record`")
        traces += [trace_from_json(rec, f"{path}:{n}") for n, rec in records]
    return traces if probe_interval is None else [thinned(t, probe_interval) for t in traces]
