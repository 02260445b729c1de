"""``codestop eval`` and ``codestop record``: a benchmark under a stopping policy, one JSON line per
question, resumable.

The output file holds one JSON object per line, written and flushed as each question finishes, so
a killed run loses only the questions in flight. Every line carries the run's ``config`` (model,
engine, method and its options, generation options); re-running the same command skips the ids
already there, a half-written last line is dropped (saying so) and redone, and a file whose config
differs is refused rather than mixed.

Recording is evaluation with another record maker: ``codestop record`` runs with no stopping (the
Vanilla policy) and a probe at every step boundary, and writes one trace per question (schema:
``docs/traces.md``) for :mod:`codestop.replay`, sweeps and figures to read without the model.

Token accounting in a run line: ``tokens`` holds each kind (prompt, reasoning, probe, probe_prompt,
answer); the summary's *tokens* are reasoning + answer (what the model wrote, probes excluded) and
its *cost* adds the probe tokens (the paper's accounting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codestop.config import GenerationConfig
from codestop.datasets import DATASETS, Example, load_examples
from codestop.engines.base import Engine
from codestop.errors import CodestopError, ContextTooLong
from codestop.grading import extract_answer, grade
from codestop.jsonl import read_jsonl
from codestop.policies import CodeStop, Policy, Vanilla, policy_options
from codestop.replay import TRACE_SCHEMA

RUN_SCHEMA = 1


# --------------------------------------------------------------------------------------------
# Run files: JSON lines with a config, resumable
# --------------------------------------------------------------------------------------------


def check_config(path: Path, records: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """Refuse to resume ``path`` when its lines were written under another config."""
    for n, rec in enumerate(records, start=1):
        theirs = rec.get("config")
        if theirs == config:
            continue
        if not isinstance(theirs, dict):
            raise CodestopError(f"out: {path} line {n} has no run config; it was not written by this command. Choose another --out")
        keys = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k))
        detail = "; ".join(f"{k}: file has {json.dumps(theirs.get(k))}, this run {json.dumps(config.get(k))}" for k in keys[:3])
        raise CodestopError(
            f"out: {path} holds a different run ({detail}); resume with the same options, or choose another --out"
        )


@dataclass
class RunFile:
    """An append-only JSON-lines output with resume: ``done`` holds the ids already written."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: dict[str, Any]) -> "RunFile":
        p = Path(path).expanduser()
        records: list[dict[str, Any]] = []
        if p.exists():
            records = read_jsonl(p, repair=True)
            check_config(p, records, config)
        else:
            if p.parent and not p.parent.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
        return cls(p, config, records)

    @property
    def done(self) -> set[str]:
        return {str(r.get("id")) for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        record = {**record, "config": self.config}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)


# --------------------------------------------------------------------------------------------
# Running questions
# --------------------------------------------------------------------------------------------


# a recording must end: a cap that fits small models, and a probe at every boundary
RECORD_GENERATION = GenerationConfig(max_new_tokens=1024, probe_interval=1)

Make = Callable[[Example, Any, float], dict[str, Any]]


def run_questions(
    engine: Engine,
    examples: Sequence[Example],
    policy: Policy,
    generation: GenerationConfig,
    out: RunFile,
    make_record: Make,
    *,
    concurrency: int = 1,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Answer every example not yet in ``out``; each record is appended as soon as it is made."""
    from codestop.api import agenerate_question

    if concurrency < 1:
        raise ValueError(f"concurrency: {concurrency!r} must be >= 1")
    done = out.done
    todo = [e for e in examples if e.id not in done]

    async def one(example: Example, gate: asyncio.Semaphore) -> None:
        async with gate:
            t0 = time.perf_counter()
            try:
                result: Any = await agenerate_question(engine, example.question, policy, generation)
            except ContextTooLong as err:
                result = err  # recorded as an error line, so a resume does not retry it forever
            record = make_record(example, result, time.perf_counter() - t0)
            out.append(record)
            if on_record:
                on_record(record)

    async def main() -> None:
        gate = asyncio.Semaphore(concurrency)
        tasks = [asyncio.create_task(one(e, gate)) for e in todo]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    asyncio.run(main())


def eval_record(example: Example, result: Any, wall_time: float) -> dict[str, Any]:
    """One line of an eval run."""
    base = {"id": example.id, "dataset": example.dataset, "gold": example.gold}
    if isinstance(result, Exception):
        return {**base, "answer": None, "correct": False, "tokens": {}, "cost": 0, "probes": [],
                "stop_reason": "error", "error": str(result), "wall_time": round(wall_time, 3)}
    answer = result.answer if result.answer is not None else extract_answer(result.answer_text)
    return {
        **base,
        "answer": answer,
        "correct": grade(answer, example.gold, example.kind),
        "tokens": dict(result.tokens),
        "cost": result.cost,
        "probes": [{"position": p.position, "confidence": round(p.confidence, 6), "answer": p.answer, "probe_tokens": p.probe_tokens}
                   for p in result.probes],
        "stop_reason": result.stop_reason,
        "stop_position": result.stop_position,
        "wall_time": round(wall_time, 3),
    }


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
                "probe_tokens": p.probe_tokens,
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


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def record_tokens(rec: dict[str, Any]) -> int:
    t = rec.get("tokens") or {}
    return int(t.get("reasoning", 0)) + int(t.get("answer", 0))


def record_cost(rec: dict[str, Any]) -> int:
    t = rec.get("tokens") or {}
    return int(t.get("reasoning", 0)) + int(t.get("probe", 0)) + int(t.get("answer", 0))


def summarize(records: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Accuracy (a fraction), mean tokens, mean cost and wall time of a run; with a baseline run,
    the paired comparison on the ids both hold: compression (1 - tokens / baseline tokens) and the
    accuracy difference."""
    n = len(records)
    s: dict[str, Any] = {
        "n": n,
        "accuracy": sum(bool(r.get("correct")) for r in records) / n if n else 0.0,
        "mean_tokens": sum(record_tokens(r) for r in records) / n if n else 0.0,
        "mean_cost": sum(record_cost(r) for r in records) / n if n else 0.0,
        "wall_time": sum(float(r.get("wall_time", 0.0)) for r in records),
    }
    if baseline is not None:
        ours = {str(r["id"]): r for r in records}
        pairs = [(ours[str(b["id"])], b) for b in baseline if str(b.get("id")) in ours]
        if pairs:
            base_tokens = sum(record_tokens(b) for _, b in pairs)
            s["paired_n"] = len(pairs)
            s["compression"] = 1 - sum(record_tokens(r) for r, _ in pairs) / base_tokens if base_tokens else 0.0
            s["baseline_accuracy"] = sum(bool(b.get("correct")) for _, b in pairs) / len(pairs)
            s["accuracy_change"] = sum(bool(r.get("correct")) - bool(b.get("correct")) for r, b in pairs) / len(pairs)
    return s


def print_summary(summary: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("questions", "accuracy", "mean tokens", "mean cost (incl. probes)", "wall time"):
        table.add_column(col, justify="right")
    row = [
        str(summary["n"]),
        f"{summary['accuracy'] * 100:.1f}%",
        f"{summary['mean_tokens']:.0f}",
        f"{summary['mean_cost']:.0f}",
        f"{summary['wall_time']:.0f} s",
    ]
    if "compression" in summary:
        table.add_column("vs baseline (paired)", justify="right")
        row.append(
            f"{summary['compression'] * 100:.1f}% fewer tokens, {summary['accuracy_change'] * 100:+.1f} pts "
            f"(n={summary['paired_n']})"
        )
    table.add_row(*row)
    Console(highlight=False).print(table)


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------


def run_config(kind: str, dataset: str, model: str, engine_name: str | None, policy: Policy, generation: GenerationConfig) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema": RUN_SCHEMA,
        "dataset": dataset,
        "model": model,
        "engine": engine_name,
        "method": policy_options(policy),
        "generation": generation.to_dict(),
    }


def _progress(total: int, done_records: Sequence[dict[str, Any]], label: str, enabled: bool) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """A rich progress bar showing running accuracy and mean tokens; returns (on_record, close)."""
    if not enabled:
        return (lambda r: None), (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    seen = list(done_records)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        transient=False,
    )

    def describe() -> str:
        if not seen:
            return label
        acc = sum(bool(r.get("correct")) for r in seen) / len(seen)
        toks = sum(record_tokens(r) for r in seen) / len(seen)
        return f"{label} acc {acc * 100:.1f}% · {toks:.0f} tok"

    task = progress.add_task(describe(), total=total, completed=len(seen))
    progress.start()

    def on_record(rec: dict[str, Any]) -> None:
        seen.append(rec)
        progress.update(task, advance=1, description=describe())

    return on_record, progress.stop


def _load_engine(model: Engine | str, engine: str | None, engine_options: dict[str, Any] | None) -> Engine:
    if isinstance(model, Engine):
        return model
    from codestop.models import load_engine

    return load_engine(model, engine=engine, **(engine_options or {}))


def _run_dataset(
    kind: str,
    model: Engine | str,
    dataset: str | None,
    data: str | os.PathLike[str] | None,
    limit: int | None,
    out: str | os.PathLike[str],
    policy: Policy,
    generation: GenerationConfig,
    make_record: Make,
    *,
    concurrency: int,
    engine: str | None,
    engine_options: dict[str, Any] | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """The one runner behind eval and record (which differ in the record they make): the questions
    not yet in ``out`` are answered and appended; returns the records of the requested questions."""
    examples = load_examples(dataset, data, limit)
    name = examples[0].dataset if examples else (dataset or "")
    model_name = model.model_name if isinstance(model, Engine) else model
    engine_name = model.name if isinstance(model, Engine) else engine
    config = run_config(kind, name, model_name, engine_name, policy, generation)
    if kind == "trace":
        config["probe_confidence"] = policy.confidence  # what the stored confidences were scored with
    run = RunFile.open(out, config)
    wanted = {e.id for e in examples}
    todo = [e for e in examples if e.id not in run.done]

    def shown(rec: dict[str, Any]) -> dict[str, Any]:  # what the progress bar counts (a trace: its final answer)
        return rec if kind == "eval" else {"correct": rec.get("final_correct"), "tokens": rec.get("tokens")}

    if todo:
        eng = _load_engine(model, engine, engine_options)
        on_record, close = _progress(len(examples), [shown(r) for r in run.records if r.get("id") in wanted], name, progress)
        try:
            run_questions(eng, todo, policy, generation, run, make_record, concurrency=concurrency,
                          on_record=lambda rec: on_record(shown(rec)))
        finally:
            close()
    return [r for r in run.records if r.get("id") in wanted]


def evaluate(
    model: Engine | str,
    dataset: str | None = None,
    *,
    out: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    policy: Policy | None = None,
    limit: int | None = None,
    baseline: str | os.PathLike[str] | None = None,
    concurrency: int = 1,
    engine: str | None = None,
    engine_options: dict[str, Any] | None = None,
    generation: GenerationConfig = GenerationConfig(),
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``dataset`` (its first ``limit`` questions) under ``policy``, appending one line per
    question to ``out`` (resuming it when it exists), and return the summary of every line in it
    (see :func:`summarize`; paired against ``baseline`` when given)."""
    base_records = read_jsonl(baseline) if baseline is not None else None
    records = _run_dataset(
        "eval", model, dataset, data, limit, out, policy if policy is not None else CodeStop(), generation, eval_record,
        concurrency=concurrency, engine=engine, engine_options=engine_options, progress=progress,
    )
    return summarize(records, base_records)


def record(
    model: Engine | str,
    dataset: str | None = None,
    *,
    out: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    engine: str | None = None,
    engine_options: dict[str, Any] | None = None,
    generation: GenerationConfig = RECORD_GENERATION,
    concurrency: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Record traces of ``dataset`` into ``out`` (resumable, like :func:`evaluate`): no stopping, a
    probe at every step boundary at least ``generation.probe_interval`` tokens after the last.
    Returns the traces of the requested questions."""
    return _run_dataset(
        "trace", model, dataset, data, limit, out, Vanilla(), generation.replace(always_probe=True), trace_record,
        concurrency=concurrency, engine=engine, engine_options=engine_options, progress=progress,
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help=f"{', '.join(DATASETS)} (from the Hugging Face hub unless --data)")
    g.add_argument("--data", default=None, help="a local JSONL/CSV copy, or any file with question and answer columns")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions")
    g.add_argument("--concurrency", type=int, default=1, help="questions in flight at once (for server engines)")


def add_parser(sub: Any) -> None:
    from codestop.cli import add_model_options, add_policy_options
    from codestop.config import add_generation_options

    p = sub.add_parser(
        "eval",
        help="run a benchmark under a stopping policy (resumable JSON lines, summary table)",
        description="Run a benchmark under a stopping policy: one JSON line per question in --out, "
        "resumed when re-run, and a summary table at the end.",
    )
    add_dataset_options(p)
    p.add_argument("--out", required=True, help="the run file (JSON lines); re-running resumes it")
    p.add_argument("--baseline", default=None, help="a vanilla run file: report compression and accuracy change against it")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_model_options(p)
    add_policy_options(p)
    add_generation_options(p)
    p.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "record",
        help="record traces: run to the end with a probe at every step boundary (for replay, sweep, calibrate)",
        description="Run the model on a benchmark with no stopping and a probe at every step boundary, "
        "one trace (JSON line, schema 1, see docs/traces.md) per question; re-running resumes.",
    )
    add_dataset_options(r)
    r.add_argument("--out", required=True, help="the trace file (JSON lines); re-running resumes it")
    add_model_options(r)
    add_generation_options(r, max_new_tokens=RECORD_GENERATION.max_new_tokens, probe_interval=RECORD_GENERATION.probe_interval)
    r.set_defaults(func=cmd_record)


def cmd_eval(args: argparse.Namespace) -> int:
    from codestop.cli import engine_options_from_args, policy_from_args

    if args.dataset is None and args.data is None:
        raise CodestopError("dataset: give --dataset (" + ", ".join(DATASETS) + ") or --data PATH")
    if args.model is None:
        from codestop.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    summary = evaluate(
        args.model,
        args.dataset,
        out=args.out,
        data=args.data,
        policy=policy_from_args(args),
        limit=args.limit,
        baseline=args.baseline,
        concurrency=args.concurrency,
        engine=args.engine,
        engine_options=engine_options_from_args(args),
        generation=GenerationConfig.from_args(args),
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, f"{args.dataset or args.data} · {args.method} · {args.model}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from codestop.cli import engine_options_from_args

    if args.dataset is None and args.data is None:
        raise CodestopError("dataset: give --dataset (" + ", ".join(DATASETS) + ") or --data PATH")
    if args.model is None:
        from codestop.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    t0 = time.perf_counter()
    traces = record(
        args.model, args.dataset, out=args.out, data=args.data, limit=args.limit, engine=args.engine,
        engine_options=engine_options_from_args(args), generation=GenerationConfig.from_args(args),
        concurrency=args.concurrency, progress=True,
    )
    n = len(traces)
    acc = sum(bool(t.get("final_correct")) for t in traces) / n if n else 0.0
    probes = sum(len(t.get("probes", ())) for t in traces) / n if n else 0.0
    length = sum(int(t.get("reasoning_tokens", 0)) for t in traces) / n if n else 0.0
    print(f"{n} traces in {args.out}: final accuracy {acc * 100:.1f}%, {length:.0f} reasoning tokens and "
          f"{probes:.1f} probes per question ({time.perf_counter() - t0:.0f} s this session)")
    return 0
