"""Summaries of eval runs and trace files, and re-grading stored runs.

:func:`summarize` gives a run's accuracy (with its Wilson interval), mean reasoning tokens, mean cost
tokens (:func:`codestop.controller.cost_tokens`), stop reasons and throughput, and paired against
a baseline run the saving; :func:`print_summary` prints it as a table. :func:`regrade_file` applies
today's grader to stored runs and traces (docs/traces.md).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from codestop.controller import cost_tokens
from codestop.errors import CodestopError
from codestop.eval.datasets import DATASETS
from codestop.grading import GRADE_KINDS, GradeKind, grade
from codestop.jsonl import read_jsonl


def record_reasoning(rec: dict[str, Any]) -> int:
    """A run line's reasoning tokens (0 for an error line)."""
    return int((rec.get("tokens") or {}).get("reasoning", 0))


def record_cost(rec: dict[str, Any]) -> int:
    """A run line's cost tokens, from its token counts (lines written before ``cost_tokens`` too)."""
    return cost_tokens(rec.get("tokens") or {})


def accuracy_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of an accuracy (scipy's binomial test), None with no questions:
    unlike the normal approximation it stays inside [0, 1] and is sound at 0 or n correct."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def summarize(
    records: Sequence[dict[str, Any]],
    baseline: Sequence[dict[str, Any]] | None = None,
    *,
    session: Sequence[dict[str, Any]] | None = None,
    elapsed: float | None = None,
) -> dict[str, Any]:
    """Accuracy (a fraction) with its 95% Wilson interval, mean reasoning tokens, mean cost tokens and
    the count of each stop reason of a run; with ``session`` (the records answered in this session)
    and ``elapsed`` (the seconds it took, loading excluded): the throughput; with a baseline run, the
    paired comparison on the ids both hold: the saving (1 - cost tokens / the baseline's) and the
    accuracy difference (docs/vocabulary.md)."""
    n = len(records)
    right = sum(bool(r.get("correct")) for r in records)
    s: dict[str, Any] = {
        "n": n,
        "accuracy": right / n if n else 0.0,
        "accuracy_ci95": accuracy_interval(right, n),
        "mean_reasoning_tokens": sum(record_reasoning(r) for r in records) / n if n else 0.0,
        "mean_cost_tokens": sum(record_cost(r) for r in records) / n if n else 0.0,
        "stop_reasons": dict(sorted(Counter(str(r.get("stop_reason")) for r in records).items())),
    }
    if elapsed is not None:
        done = list(session or ())
        s["elapsed_s"] = elapsed
        s["session_n"] = len(done)
        # generated tokens, probes included: what the engine produced in this session
        s["questions_per_s"] = len(done) / elapsed if done and elapsed > 0 else None
        s["tokens_per_s"] = sum(record_cost(r) for r in done) / elapsed if done and elapsed > 0 else None
    if baseline is not None:
        ours = {str(r["id"]): r for r in records}
        pairs = [(ours[str(b["id"])], b) for b in baseline if str(b.get("id")) in ours]
        if pairs:
            base_cost = sum(record_cost(b) for _, b in pairs)
            s["paired_n"] = len(pairs)
            s["saving"] = 1 - sum(record_cost(r) for r, _ in pairs) / base_cost if base_cost else 0.0
            s["baseline_accuracy"] = sum(bool(b.get("correct")) for _, b in pairs) / len(pairs)
            s["accuracy_change"] = sum(bool(r.get("correct")) - bool(b.get("correct")) for r, b in pairs) / len(pairs)
    return s


def _elapsed_line(summary: dict[str, Any]) -> str | None:
    """This session's elapsed time and throughput, in words (None when the summary has no timing)."""
    if "elapsed_s" not in summary:
        return None
    if not summary["session_n"]:
        return "elapsed: nothing left to answer (every question was already in the run file)"
    return (
        f"elapsed: {summary['elapsed_s']:.1f} s for the {summary['session_n']} questions answered now (model loading excluded): "
        f"{summary['questions_per_s']:.2f} questions/s, {summary['tokens_per_s']:.0f} generated tokens/s (probes included)"
    )


def print_summary(summary: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("questions", "accuracy (95% CI)", "mean reasoning tokens", "mean cost tokens (incl. probes)"):
        table.add_column(col, justify="right")
    ci = summary.get("accuracy_ci95")
    row = [
        str(summary["n"]),
        f"{summary['accuracy'] * 100:.1f}%" + (f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]" if ci else ""),
        f"{summary['mean_reasoning_tokens']:.0f}",
        f"{summary['mean_cost_tokens']:.0f}",
    ]
    if "saving" in summary:
        table.add_column("vs baseline (paired)", justify="right")
        row.append(
            f"saving {summary['saving'] * 100:.1f}%, {summary['accuracy_change'] * 100:+.1f} pts "
            f"(n={summary['paired_n']})"
        )
    table.add_row(*row)
    console = Console(highlight=False)
    console.print(table)
    reasons = summary.get("stop_reasons") or {}
    if reasons:
        console.print("stop reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))), soft_wrap=True)
    line = _elapsed_line(summary)
    if line:
        console.print(line, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# Re-grading
# --------------------------------------------------------------------------------------------


def regrade(record: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``record`` (a run line or a trace) graded again with today's :func:`grade`, and how many of
    its verdicts changed: every probe's ``correct`` and the final one (``correct`` or
    ``final_correct``). Nothing else is touched, so a grader fix can be applied to stored runs."""
    gold = str(record.get("gold", ""))
    stated = record.get("grading")
    if stated is None:  # a run line from before lines named their grading: the dataset's
        spec = DATASETS.get(str(record.get("dataset")))
        stated = spec.kind if spec is not None else "math"
    if stated not in GRADE_KINDS:
        raise CodestopError(f"grading: {record.get('id')!r} says {stated!r}; expected one of {', '.join(GRADE_KINDS)}")
    kind = cast(GradeKind, stated)
    flips = 0
    out = dict(record)
    if isinstance(record.get("probes"), list) and all("correct" in p for p in record["probes"]):
        probes = []
        for p in record["probes"]:
            verdict = grade(p.get("answer"), gold, kind)
            flips += verdict != bool(p["correct"])
            probes.append({**p, "correct": verdict})
        out["probes"] = probes
    for answer_key, verdict_key in (("final_answer", "final_correct"), ("answer", "correct")):
        if verdict_key in record and record.get("stop_reason", record.get("finish_reason")) != "error":
            verdict = grade(record.get(answer_key), gold, kind)
            flips += verdict != bool(record[verdict_key])
            out[verdict_key] = verdict
    return out, flips


def regrade_file(path: str | os.PathLike[str]) -> int:
    """Re-grade a run or trace file in place (see :func:`regrade`), written whole to a temporary
    file first; returns the number of verdicts that changed."""
    p = Path(path)
    records = read_jsonl(p)
    flips = 0
    lines = []
    for rec in records:
        new, k = regrade(rec)
        flips += k
        lines.append(json.dumps(new, ensure_ascii=False) + "\n")
    tmp = p.with_name(p.name + f".{os.getpid()}.partial")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, p)
    return flips


