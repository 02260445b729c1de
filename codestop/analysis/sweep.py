"""``codestop sweep``: a policy's one knob over a range, replayed on recorded traces.

A sweep replays each method over a range of its one knob (CoDE-Stop's ``tau``, DEER's
``threshold``, Consistency's ``window``, TokenBudget's ``budget``) and gives one :class:`Point` per
setting: accuracy, mean reasoning tokens, mean cost tokens and the saving against vanilla on the
same traces, with the Pareto set marked; as CSV and a Markdown table here, as a figure in
:mod:`codestop.figures.tradeoff`. Calibration (choosing a knob with a bound) is
:mod:`codestop.analysis.calibrate`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError
from codestop.policies import Policy, Probe, knob_help, make_policy, options_for, swept_knobs
from codestop.replay import Replayed, replay_trace, rescored
from codestop.traces import Trace

# each method's one knob, its type and the range swept when none is given (from the policies' fields)
KNOBS: dict[str, tuple[str, type, str]] = swept_knobs()
# the other knobs: fixed at one value for the methods that take them
FIXED_OPTIONS = tuple(k for k in knob_help() if k not in {knob for knob, _, _ in KNOBS.values()})


def parse_range(text: str, kind: type = float, name: str = "range") -> list[Any]:
    """``start:stop:step`` (stop included), a comma list, or one value."""
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, step = (float(p) for p in parts)
            if step <= 0 or stop < start:
                raise CodestopError(f"{name}: {text!r}: need start <= stop and step > 0 (start:stop:step)")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CodestopError(f"{name}: {text!r} is not start:stop:step, a comma list, or a number") from None
    if not values:
        raise CodestopError(f"{name}: {text!r} holds no value")
    if kind is int:
        if any(v != int(v) for v in values):
            raise CodestopError(f"{name}: {text!r} must hold whole numbers")
        return sorted({int(v) for v in values})
    return sorted(set(values))


@dataclass
class Point:
    """One policy's replayed outcome on all traces; ``pareto``: no other point of the sweep is at
    least as accurate with fewer reasoning tokens (or more accurate with as few)."""

    method: str
    knob: str
    value: float | int | None
    n: int
    accuracy: float
    mean_reasoning_tokens: float
    mean_cost_tokens: float  # replayed: reasoning + probe tokens (docs/vocabulary.md)
    accuracy_change: float  # vs vanilla on the same traces, a fraction
    saving: float  # 1 - mean_cost_tokens / vanilla's
    pareto: bool = False


def run_policy(traces: Sequence[Trace], policy: Policy, cache: dict[str, list[list[Probe]]] | None = None) -> list[Replayed]:
    """Replay ``policy`` on every trace; ``cache`` keeps the re-scored probes per confidence function."""
    if cache is not None:
        if policy.confidence not in cache:
            cache[policy.confidence] = [rescored(t.probes, policy.confidence) for t in traces]
        probes = cache[policy.confidence]
        return [replay_trace(t, policy, p) for t, p in zip(traces, probes)]
    return [replay_trace(t, policy) for t in traces]


def first_unlabelled(traces: Sequence[Trace]) -> Trace | None:
    """The first trace with a probe or a final answer but no ``correct`` for it (no gold), or None."""
    return next((t for t in traces if not t.labelled), None)


def require_labels(traces: Sequence[Trace], what: str) -> None:
    """Refuse unlabelled traces for ``what``, which needs to know which answers are right."""
    bad = first_unlabelled(traces)
    if bad is not None:
        raise CodestopError(
            f"traces: {what} needs labelled traces (every probe's and the final answer's 'correct'), and trace {bad.id!r} "
            "has none (unlabelled traces, such as the proxy's shadow traces, have no gold); "
            "`codestop calibrate --risk changed` needs no labels")


def mean_of(rows: Sequence[Replayed]) -> tuple[float, float, float]:
    """(accuracy, mean reasoning tokens, mean cost tokens) of replayed rows (labelled traces)."""
    n = len(rows)
    return sum(bool(r.correct) for r in rows) / n, sum(r.reasoning_tokens for r in rows) / n, sum(r.cost_tokens for r in rows) / n


def saving(cost: float, vanilla_cost: float) -> float:
    """1 - cost / vanilla's cost (0 when vanilla cost nothing)."""
    return 1 - cost / vanilla_cost if vanilla_cost else 0.0


def _point(method: str, knob: str, value: Any, rows: Sequence[Replayed], vanilla: Sequence[Replayed]) -> Point:
    acc, toks, cost = mean_of(rows)
    v_acc, _, v_cost = mean_of(vanilla)
    return Point(method, knob, value, len(rows), acc, toks, cost, acc - v_acc, saving(cost, v_cost))


def mark_pareto(points: list[Point]) -> None:
    for p in points:
        p.pareto = not any(
            (q.accuracy >= p.accuracy and q.mean_reasoning_tokens <= p.mean_reasoning_tokens)
            and (q.accuracy > p.accuracy or q.mean_reasoning_tokens < p.mean_reasoning_tokens)
            for q in points
        )


def knob_setting(method: str, value: Any = None, **options: Any) -> dict[str, Any]:
    """The policy dict (for :func:`~codestop.policies.make_policy`) of ``method`` with its swept knob
    at ``value`` and, of ``options``, those it takes."""
    swept = {KNOBS[method][0]: value} if method in KNOBS and value is not None else {}
    return {"method": method, **options_for(method, options), **swept}


def sweep(traces: Sequence[Trace], ranges: Mapping[str, Sequence[Any]], **options: Any) -> list[Point]:
    """Points for vanilla and for each method over its knob values; ``options`` (delta, r_min, ...,
    confidence) go to the methods that take them."""
    if not traces:
        raise CodestopError("traces: no traces to sweep")
    require_labels(traces, "a sweep (accuracy against tokens)")
    cache: dict[str, list[list[Probe]]] = {}
    vanilla = run_policy(traces, make_policy("vanilla"), cache)
    points = [_point("vanilla", "", None, vanilla, vanilla)]
    for method, values in ranges.items():
        if method == "vanilla":
            continue
        if method not in KNOBS:
            raise CodestopError(f"method: {method!r} has no knob to sweep; choose from {', '.join(KNOBS)}")
        knob = KNOBS[method][0]
        for value in values:
            policy = make_policy(knob_setting(method, value, **options))
            points.append(_point(method, knob, value, run_policy(traces, policy, cache), vanilla))
    mark_pareto(points)
    return points


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def markdown_table(points: Sequence[Point], only_pareto: bool = False) -> str:
    rows = ["| method | knob | accuracy | mean reasoning tokens | mean cost tokens (incl. probes) | accuracy change | saving | Pareto |",
            "|---|---|---:|---:|---:|---:|---:|:-:|"]
    for p in points:
        if only_pareto and not p.pareto:
            continue
        knob = f"{p.knob}={p.value}" if p.knob else "-"
        rows.append(
            f"| {p.method} | {knob} | {p.accuracy * 100:.1f}% | {p.mean_reasoning_tokens:.0f} | {p.mean_cost_tokens:.0f} | "
            f"{p.accuracy_change * 100:+.1f} pts | {p.saving * 100:.1f}% | {'yes' if p.pareto else ''} |"
        )
    return "\n".join(rows) + "\n"


def write_csv(points: Sequence[Point], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(asdict(points[0])))
        w.writeheader()
        for p in points:
            w.writerow(asdict(p))
