"""``codestop eval``: a benchmark under a stopping policy, one JSON line per question, resumable.

The output file holds one JSON object per line, written and flushed as each question finishes, so
a killed run loses only the questions in flight. Every line carries the run's ``config`` (model,
engine, method and its options, generation options); re-running the same command skips the ids
already there, a half-written last line is dropped and redone, and a file whose config differs is
refused rather than mixed. ``codestop record`` (:mod:`codestop.traces`) writes its trace files
through the same machinery.

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

from codestop.datasets import DATASETS, Example, load_examples
from codestop.engines.base import CodestopError, ContextTooLong, Engine
from codestop.grading import extract_answer, grade
from codestop.policies import Policy, policy_options

RUN_SCHEMA = 1


# --------------------------------------------------------------------------------------------
# Run files: JSON lines with a config, resumable
# --------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike[str], repair: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a run or trace file, one per line.

    A last line that does not parse (cut short by a killed writer) is dropped; with ``repair`` the
    file is also truncated to its last complete line, so appending continues cleanly. A bad line
    anywhere else raises an error naming the file and line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise CodestopError(f"file: cannot read {str(p)!r} ({err.strerror})") from None
    lines = raw.split(b"\n")
    records: list[dict[str, Any]] = []
    good_end = 0  # bytes of the file that hold complete, valid lines
    for n, line in enumerate(lines, start=1):
        is_last = n == len(lines) or (n == len(lines) - 1 and lines[-1] == b"")
        if line.strip():
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("a JSON value that is not an object")
            except (ValueError, UnicodeDecodeError) as err:
                if is_last:
                    break  # half-written by a killed run: dropped, and redone on resume
                raise CodestopError(f"file: {p}:{n}: not a valid JSON object ({err}); fix or delete that line") from None
            records.append(obj)
        good_end = min(good_end + len(line) + 1, len(raw))
    if repair:
        if good_end < len(raw):
            with open(p, "r+b") as fh:
                fh.truncate(good_end)
        elif raw and not raw.endswith(b"\n"):
            with open(p, "ab") as fh:  # a complete last line that lost only its newline
                fh.write(b"\n")
    return records


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


@dataclass(frozen=True)
class GenerationOptions:
    """The options of :func:`codestop.api.agenerate_question` a run fixes (part of its config)."""

    family: str | None = None
    enable_thinking: bool | None = None
    max_new_tokens: int = 32768
    probe_interval: int = 32
    boundaries: tuple[str, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["boundaries"] = list(self.boundaries) if self.boundaries is not None else None
        return d


Make = Callable[[Example, Any, float], dict[str, Any]]


def run_questions(
    engine: Engine,
    examples: Sequence[Example],
    policy: Policy,
    generation: GenerationOptions,
    out: RunFile,
    make_record: Make,
    *,
    concurrency: int = 1,
    probe_every_boundary: bool = False,
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
                result: Any = await agenerate_question(
                    engine, example.question, policy, probe_every_boundary=probe_every_boundary, **generation.as_kwargs()
                )
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
        "probes": [{"position": p.position, "confidence": round(p.confidence, 6), "answer": p.answer, "tokens": p.tokens} for p in result.probes],
        "stop_reason": result.stop_reason,
        "stop_position": result.stop_position,
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


def run_config(kind: str, dataset: str, model: str, engine_name: str | None, policy: Policy, generation: GenerationOptions) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema": RUN_SCHEMA,
        "dataset": dataset,
        "model": model,
        "engine": engine_name,
        "method": policy_options(policy),
        "generation": generation.as_kwargs(),
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
    generation: GenerationOptions = GenerationOptions(),
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``dataset`` (its first ``limit`` questions) under ``policy``, appending one line per
    question to ``out`` (resuming it when it exists), and return the summary of every line in it
    (see :func:`summarize`; paired against ``baseline`` when given)."""
    from codestop.policies import CodeStop

    policy = policy if policy is not None else CodeStop()
    examples = load_examples(dataset, data, limit)
    name = examples[0].dataset if examples else (dataset or "")
    model_name = model.model_name if isinstance(model, Engine) else model
    engine_name = model.name if isinstance(model, Engine) else engine
    config = run_config("eval", name, model_name, engine_name, policy, generation)
    run = RunFile.open(out, config)
    base_records = read_jsonl(baseline) if baseline is not None else None
    wanted = {e.id for e in examples}
    todo = [e for e in examples if e.id not in run.done]
    if todo:
        eng = _load_engine(model, engine, engine_options)
        on_record, close = _progress(len(examples), [r for r in run.records if r.get("id") in wanted], name, progress)
        try:
            run_questions(eng, todo, policy, generation, run, eval_record, concurrency=concurrency, on_record=on_record)
        finally:
            close()
    records = [r for r in run.records if r.get("id") in wanted]
    return summarize(records, base_records)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help=f"{', '.join(DATASETS)} (from the Hugging Face hub unless --data)")
    g.add_argument("--data", default=None, help="a local JSONL/CSV copy, or any file with question and answer columns")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions")
    g.add_argument("--concurrency", type=int, default=1, help="questions in flight at once (for server engines)")


def generation_from_args(args: argparse.Namespace) -> GenerationOptions:
    from codestop.cli import generation_options

    opts = generation_options(args)
    if opts["boundaries"] is not None:
        opts["boundaries"] = tuple(opts["boundaries"])
    return GenerationOptions(**opts)


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: getattr(args, k)
        for k in ("dtype", "device", "threads", "base_url", "api_key", "tokenizer")
        if getattr(args, k, None) is not None and not (k in ("dtype", "device") and getattr(args, k) == "auto")
    }


def add_parser(sub: Any) -> None:
    from codestop.cli import add_generation_options, add_model_options, add_policy_options

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


def cmd_eval(args: argparse.Namespace) -> int:
    from codestop.cli import policy_from_args

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
        generation=generation_from_args(args),
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, f"{args.dataset or args.data} · {args.method} · {args.model}")
    return 0
