"""The runner behind ``codestop eval`` and ``codestop record``: a benchmark under a stopping policy,
one JSON line per question, resumable (the files: :mod:`codestop.eval.runfiles`; summaries:
:mod:`codestop.eval.summary`).

A run is described by one :class:`RunSpec` (what to answer, with which model, where to write);
:func:`evaluate` and :func:`record` take one, or its fields as keyword arguments. Each line is
written and flushed as its question finishes, so a killed run loses only the questions in flight;
re-running the same command resumes the file.

Recording is evaluation with another record maker: ``codestop record`` runs with no stopping (the
Vanilla policy) and a probe at every step boundary, and writes one trace per question (schema:
``docs/traces.md``, written by :func:`codestop.traces.trace_line`) for :mod:`codestop.replay`,
sweeps and figures to read without the model.

Token accounting in a run line (docs/vocabulary.md): ``tokens`` holds each kind (prompt, reasoning,
probe, probe_prompt, answer, overrun); ``cost_tokens`` is what the question cost, reasoning + probe +
answer + overrun tokens (:func:`codestop.controller.cost_tokens`; prompts are prefilled, not
generated, and not in it). The summary's ``mean_reasoning_tokens`` counts the reasoning alone, its
``mean_cost_tokens`` and its ``saving`` against a baseline the cost tokens.

What a harness user expects besides (lm-evaluation-harness is the reference):

* ``--log-samples`` writes ``<run>.samples.jsonl`` beside the run file, one line per question with
  the question, the reasoning, the answer text, the extracted answer, the gold and the verdict (as
  lm-eval's ``--log_samples``), so a grade can be checked by reading what the model wrote;
* the summary gives the accuracy with a 95% Wilson interval (scipy), the count of each stop
  reason, and this session's elapsed time and throughput (questions and generated tokens per
  second, model loading excluded): the per-question times overlap under ``--questions-in-flight``, so
  their sum is no time anyone waited;
* the run config records the codestop version, the prompt actually sent (:mod:`codestop.eval.prompts`)
  and, for a model that is a local file, its sha256 (hashed once per file version), so a run file
  says what produced it; a resumed run says so on stderr.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from codestop.config import GenerationConfig
from codestop.engines.base import Engine
from codestop.errors import ContextTooLong
from codestop.eval.datasets import Example, load_examples
from codestop.eval.prompts import PromptStyle, resolve_prompt
from codestop.eval.runfiles import RunFile, SampleLog, model_sha256, run_config, samples_path
from codestop.eval.summary import record_reasoning, summarize
from codestop.families import Family, get_family
from codestop.grading import grade
from codestop.jsonl import read_jsonl
from codestop.policies import CodeStop, Policy, Vanilla
from codestop.traces import final_answer, trace_line


def sample_record(example: Example, result: Any, record: dict[str, Any]) -> dict[str, Any]:
    """One ``--log-samples`` line: what was asked, what the model wrote, what was read from it and
    the verdict (the run line's own, so the two files never disagree)."""
    correct = record.get("correct", record.get("final_correct"))
    answer = record.get("answer", record.get("final_answer"))
    if isinstance(result, Exception):
        return {"id": example.id, "question": example.question, "reasoning": "", "answer_text": "", "answer": None,
                "gold": example.gold, "correct": False, "stop_reason": "error", "error": str(result)}
    return {
        "id": example.id,
        "question": example.question,
        "reasoning": result.reasoning_text,
        "answer_text": result.answer_text,
        "answer": answer,
        "gold": example.gold,
        "correct": bool(correct),
        "stop_reason": result.stop_reason,
    }


# --------------------------------------------------------------------------------------------
# Running questions
# --------------------------------------------------------------------------------------------


# a recording must end: a cap that fits small models, and a probe at every boundary
RECORD_GENERATION = GenerationConfig(max_reasoning_tokens=1024, probe_interval=1)

Make = Callable[[Example, Any, float], dict[str, Any]]


def run_questions(
    engine: Engine,
    examples: Sequence[Example],
    policy: Policy,
    generation: GenerationConfig,
    out: RunFile | None,
    make_record: Make,
    *,
    questions_in_flight: int = 1,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    family: Family | None = None,
    samples: SampleLog | None = None,
) -> None:
    """Answer every example not yet in ``out``; each record is appended as soon as it is made (and
    its sample, when ``samples`` logs them). ``out`` None: every example, nothing written (the demo). ``family``: the prompt family (with its prompt style)
    every question is asked through; None: the one ``generation`` names or the engine's own."""
    from codestop.controller import agenerate

    if questions_in_flight < 1:
        raise ValueError(f"questions_in_flight: {questions_in_flight!r} must be >= 1")
    done = out.done if out is not None else set()
    todo = [e for e in examples if e.id not in done]

    async def one(example: Example, gate: asyncio.Semaphore) -> None:
        async with gate:
            t0 = time.perf_counter()
            try:
                result: Any = await agenerate(engine, example.question, policy, generation, family=family)
            except ContextTooLong as err:
                result = err  # recorded as an error line, so a resume does not retry it forever
            record = make_record(example, result, time.perf_counter() - t0)
            if out is not None:
                out.append(record)
            if samples is not None:
                samples.append(sample_record(example, result, record))
            if on_record:
                on_record(record)

    async def main() -> None:
        gate = asyncio.Semaphore(questions_in_flight)
        tasks = [asyncio.create_task(one(e, gate)) for e in todo]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    asyncio.run(main())


def eval_record(example: Example, result: Any, wall_time: float) -> dict[str, Any]:
    """One line of an eval run."""
    base = {"id": example.id, "dataset": example.dataset, "gold": example.gold, "grading": example.kind}
    if isinstance(result, Exception):
        return {**base, "answer": None, "correct": False, "tokens": {}, "cost_tokens": 0, "probes": [],
                "stop_reason": "error", "error": str(result), "wall_time": round(wall_time, 3)}
    answer = final_answer(result)
    return {
        **base,
        "answer": answer,
        "correct": grade(answer, example.gold, example.kind),
        "tokens": dict(result.tokens),
        "cost_tokens": result.cost_tokens,
        "probes": [{"position": p.position, "confidence": round(p.confidence, 6), "answer": p.answer, "probe_tokens": p.probe_tokens}
                   for p in result.probes],
        "stop_reason": result.stop_reason,
        "stop_position": result.tokens["reasoning"],  # the old key, one release more
        "wall_time": round(wall_time, 3),
    }


def trace_record(example: Example, result: Any, wall_time: float) -> dict[str, Any]:
    """One trace line of a recording (:func:`codestop.traces.trace_line`), graded against the example's gold."""
    return trace_line(result, id=example.id, dataset=example.dataset, gold=example.gold, grading=example.kind,
                      wall_time=wall_time)


# --------------------------------------------------------------------------------------------
# evaluate() and record()
# --------------------------------------------------------------------------------------------


def _progress(total: int, done_records: Sequence[dict[str, Any]], label: str, enabled: bool) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """A rich progress bar showing running accuracy and mean tokens; returns (on_record, close)."""
    if not enabled:
        return (lambda r: None), (lambda: None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    seen = list(done_records)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        transient=False,
    )

    def describe() -> str:
        if not seen:
            return label
        acc = sum(bool(r.get("correct")) for r in seen) / len(seen)
        toks = sum(record_reasoning(r) for r in seen) / len(seen)
        return f"{label} acc {acc * 100:.1f}% · {toks:.0f} reasoning tok"

    task = progress.add_task(describe(), total=total, completed=len(seen))
    progress.start()

    def on_record(rec: dict[str, Any]) -> None:
        seen.append(rec)
        progress.update(task, advance=1, description=describe())

    return on_record, progress.stop


@dataclass(frozen=True)
class RunSpec:
    """One run of eval or record: which questions (``dataset`` or a local ``data`` file, its first
    ``limit`` after ``offset``; ``split`` names the choice in every record), which model
    (an engine, or a name loaded with ``engine`` and ``engine_options``), how they are asked
    (``generation``: None is the verb's default; ``prompt``: a style name, a template file or a
    :class:`PromptStyle`, with ``system_prompt``), and where the lines go (``out``, resumed when it
    exists; ``log_samples``: also :func:`samples_path`). ``questions_in_flight``: questions
    answered at once (``concurrency`` is its old name, still taken); ``progress``: a progress bar on the terminal."""

    model: Engine | str
    out: str | os.PathLike[str]
    dataset: str | None = None
    data: str | os.PathLike[str] | None = None
    limit: int | None = None
    offset: int = 0
    split: str | None = None
    engine: str | None = None
    engine_options: Mapping[str, Any] | None = None
    generation: GenerationConfig | None = None
    prompt: str | PromptStyle | None = None
    system_prompt: str | None = None
    questions_in_flight: int = 1
    progress: bool = False
    log_samples: bool = False

    def prompt_style(self) -> PromptStyle:
        return self.prompt if isinstance(self.prompt, PromptStyle) else resolve_prompt(self.prompt, self.system_prompt)


def run_spec(model: Engine | str | RunSpec, dataset: str | None, options: Mapping[str, Any]) -> RunSpec:
    """``model`` when it is a RunSpec (then nothing else may be given), else the spec its arguments build."""
    if isinstance(model, RunSpec):
        if dataset is not None or options:
            given = ["dataset"] * (dataset is not None) + sorted(options)
            raise TypeError(f"a RunSpec was given: give {', '.join(given)} in it, not beside it")
        return model
    if "concurrency" in options:  # the old name (eval's --concurrency), one release more
        warnings.warn("concurrency= is now questions_in_flight=", DeprecationWarning, stacklevel=3)
        options = {"questions_in_flight": options["concurrency"], **{k: v for k, v in options.items() if k != "concurrency"}}
    return RunSpec(model, dataset=dataset, **options)


def _load_engine(spec: RunSpec) -> Engine:
    if isinstance(spec.model, Engine):
        return spec.model
    from codestop.models import load_engine

    return load_engine(spec.model, engine=spec.engine, **(spec.engine_options or {}))


@dataclass
class RunOutcome:
    """What one call of the runner did: the requested questions' records, those answered in this
    session, and the seconds answering them took (model loading excluded)."""

    records: list[dict[str, Any]]
    session: list[dict[str, Any]]
    elapsed: float


def _run_dataset(kind: str, spec: RunSpec, policy: Policy, generation: GenerationConfig, make_record: Make) -> RunOutcome:
    """The one runner behind eval and record (which differ in the record they make): the questions
    not yet in ``spec.out`` are answered under ``policy`` and ``generation`` (the spec's, or the
    verb's default) and appended."""
    prompt = spec.prompt_style()
    examples = load_examples(spec.dataset, spec.data, spec.limit, spec.offset)
    name = examples[0].dataset if examples else (spec.dataset or "")
    model = spec.model
    model_name = model.model_name if isinstance(model, Engine) else model
    engine_name = model.name if isinstance(model, Engine) else spec.engine
    config = run_config(kind, name, model_name, engine_name, policy, generation, prompt, model_sha256(model), spec.offset, spec.split)
    if kind == "trace":
        config["probe_confidence"] = policy.confidence  # what the stored confidences were scored with
    run = RunFile.open(spec.out, config)
    wanted = {e.id for e in examples}
    todo = [e for e in examples if e.id not in run.done]
    if run.records:
        verb = "eval" if kind == "eval" else "record"
        older = sorted({str((r.get("config") or {}).get("codestop_version")) for r in run.records} - {config["codestop_version"]})
        print(f"codestop {verb}: resuming {run.path} from its {len(run.records)} rows; {len(todo)} of the "
              f"{len(examples)} questions left to answer"
              + (f" (rows written by codestop {', '.join(older)}; new rows record {config['codestop_version']})" if older else ""),
              file=sys.stderr)
    samples = SampleLog.open(samples_path(run.path)) if spec.log_samples else None

    def shown(rec: dict[str, Any]) -> dict[str, Any]:  # what the progress bar counts (a trace: its final answer)
        return rec if kind == "eval" else {"correct": rec.get("final_correct"), "tokens": rec.get("tokens")}

    session: list[dict[str, Any]] = []
    elapsed = 0.0
    if todo:
        eng = _load_engine(spec)
        # the prompt family of the loaded engine (thinking tags, answer prompt), asking the chosen style
        family = prompt.apply(get_family(generation.family, eng, generation.enable_thinking))
        on_record, close = _progress(len(examples), [shown(r) for r in run.records if r.get("id") in wanted], name, spec.progress)

        def record_done(rec: dict[str, Any]) -> None:
            session.append(rec)
            on_record(shown(rec))

        t0 = time.perf_counter()
        try:
            run_questions(eng, todo, policy, generation, run, make_record, questions_in_flight=spec.questions_in_flight,
                          on_record=record_done, family=family, samples=samples)
        finally:
            elapsed = time.perf_counter() - t0
            close()
    return RunOutcome([r for r in run.records if r.get("id") in wanted], session, elapsed)


def evaluate(
    model: Engine | str | RunSpec,
    dataset: str | None = None,
    *,
    policy: Policy | None = None,
    baseline: str | os.PathLike[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run a benchmark under ``policy`` (CoDE-Stop with its defaults when None), appending one line
    per question to the spec's ``out`` (resuming it when it exists), and return the summary of every
    line in it (see :func:`summarize`; paired against the ``baseline`` run file when given).

    ``model`` is a :class:`RunSpec`, or its ``model`` with ``dataset`` and the other fields as keyword
    arguments (``evaluate("qwen2.5-coder-0.5b", "gsm8k", out="run.jsonl", limit=50)``); ``generation``
    defaults to ``GenerationConfig()``."""
    spec = run_spec(model, dataset, options)
    base_records = read_jsonl(baseline) if baseline is not None else None
    generation = spec.generation if spec.generation is not None else GenerationConfig()
    outcome = _run_dataset("eval", spec, policy if policy is not None else CodeStop(), generation, eval_record)
    return summarize(outcome.records, base_records, session=outcome.session, elapsed=outcome.elapsed)


def record(model: Engine | str | RunSpec, dataset: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """Record traces into the spec's ``out`` (resumable, like :func:`evaluate`): no stopping, a
    probe at every step boundary at least ``generation.probe_interval`` tokens after the last
    (``generation`` defaults to :data:`RECORD_GENERATION`). Takes a :class:`RunSpec` or its fields,
    as :func:`evaluate` does. Returns the traces of the requested questions."""
    spec = run_spec(model, dataset, options)
    generation = spec.generation if spec.generation is not None else RECORD_GENERATION
    return _run_dataset("trace", spec, Vanilla(), generation.replace(always_probe=True), trace_record).records
