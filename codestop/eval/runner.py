"""The runner behind ``codestop eval`` and ``codestop record``: a benchmark under a stopping policy,
one JSON line per question, resumable (summaries: :mod:`codestop.eval.summary`).

The output file holds one JSON object per line, written and flushed as each question finishes, so
a killed run loses only the questions in flight. Every line carries the run's ``config`` (model,
engine, policy and its options, generation options); re-running the same command skips the ids
already there, a half-written last line is dropped (saying so) and redone, and a file whose config
differs is refused rather than mixed.

Recording is evaluation with another record maker: ``codestop record`` runs with no stopping (the
Vanilla policy) and a probe at every step boundary, and writes one trace per question (schema:
``docs/traces.md``, :mod:`codestop.traces`) for :mod:`codestop.replay`, sweeps and figures to read without the model.

Token accounting in a run line: ``tokens`` holds each kind (prompt, reasoning, probe, probe_prompt,
answer); the summary's *tokens* are reasoning + answer (what the model wrote, probes excluded) and
its *cost* adds the probe tokens (the paper's accounting).

What a harness user expects besides (lm-evaluation-harness is the reference):

* ``--log-samples`` writes ``<run>.samples.jsonl`` beside the run file, one line per question with
  the question, the reasoning, the answer text, the extracted answer, the gold and the verdict (as
  lm-eval's ``--log_samples``), so a grade can be checked by reading what the model wrote;
* the summary gives the accuracy with a 95% Wilson interval (scipy), the count of each stop
  reason, and this session's elapsed time and throughput (questions and generated tokens per
  second, model loading excluded): the per-question times overlap under ``--concurrency``, so
  their sum is no time anyone waited;
* the run config records the codestop version, the prompt actually sent (:mod:`codestop.eval.prompts`)
  and, for a model that is a local file, its sha256 (hashed once per file version), so a run file
  says what produced it; a resumed run says so on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codestop.config import GenerationConfig, current_names
from codestop.engines.base import Engine
from codestop.errors import CodestopError, ContextTooLong
from codestop.eval.datasets import Example, load_examples
from codestop.eval.grading import extract_answer, grade
from codestop.eval.prompts import PromptStyle, resolve_prompt
from codestop.eval.summary import record_reasoning, summarize
from codestop.families import Family, get_family
from codestop.jsonl import read_jsonl
from codestop.policies import CodeStop, Policy, Probe, Vanilla, policy_options
from codestop.traces import TRACE_SCHEMA

RUN_SCHEMA = 1
# config keys that describe a line without defining the run: a resume may differ in them
INFORMATIONAL_KEYS = ("codestop_version",)


# --------------------------------------------------------------------------------------------
# Run files: JSON lines with a config, resumable
# --------------------------------------------------------------------------------------------


def current_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as this codestop writes it, from one written before a key was renamed: ``method``
    (the policy's options) is ``policy``, ``generation.max_new_tokens`` is ``max_reasoning_tokens``."""
    if "method" in config and "policy" not in config:
        config = {**{k: v for k, v in config.items() if k != "method"}, "policy": config["method"]}
    if isinstance(config.get("generation"), dict):
        config = {**config, "generation": current_names(config["generation"])}
    return config


def check_config(path: Path, records: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """Refuse to resume ``path`` when its lines were written under another config (the codestop
    version aside: each line records its own, and a fix release should not strand a long run)."""
    for n, rec in enumerate(records, start=1):
        theirs = rec.get("config")
        if theirs == config:
            continue
        if not isinstance(theirs, dict):
            raise CodestopError(f"out: {path} line {n} has no run config; it was not written by this command. Choose another --out")
        theirs = current_config(theirs)
        keys = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k) and k not in INFORMATIONAL_KEYS)
        if not keys:
            continue
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
    def open(cls, path: str | os.PathLike[str], config: dict[str, Any]) -> RunFile:
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


def samples_path(out: str | os.PathLike[str]) -> Path:
    """Where ``--log-samples`` writes beside a run file: ``run.jsonl`` -> ``run.samples.jsonl``."""
    p = Path(out).expanduser()
    return p.with_name(p.name.removesuffix(".jsonl") + ".samples.jsonl")


@dataclass
class SampleLog:
    """The ``--log-samples`` file: one line per question, appended as it finishes; a question
    already logged (a resumed run) is not logged twice."""

    path: Path
    logged: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SampleLog:
        p = Path(path)
        logged = {str(r.get("id")) for r in read_jsonl(p, repair=True)} if p.exists() else set()
        return cls(p, logged)

    def append(self, sample: dict[str, Any]) -> None:
        if str(sample["id"]) in self.logged:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
            fh.flush()
        self.logged.add(str(sample["id"]))


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
    concurrency: int = 1,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    family: Family | None = None,
    samples: SampleLog | None = None,
) -> None:
    """Answer every example not yet in ``out``; each record is appended as soon as it is made (and
    its sample, when ``samples`` logs them). ``out`` None: every example, nothing written (the demo). ``family``: the prompt family (with its prompt style)
    every question is asked through; None: the one ``generation`` names or the engine's own."""
    from codestop.controller import agenerate

    if concurrency < 1:
        raise ValueError(f"concurrency: {concurrency!r} must be >= 1")
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
    base = {"id": example.id, "dataset": example.dataset, "gold": example.gold, "grading": example.kind}
    if isinstance(result, Exception):
        return {**base, "answer": None, "correct": False, "tokens": {}, "cost_tokens": 0, "probes": [],
                "stop_reason": "error", "error": str(result), "wall_time": round(wall_time, 3)}
    answer = result.answer if result.answer is not None else extract_answer(result.answer_text)
    return {
        **base,
        "answer": answer,
        "correct": grade(answer, example.gold, example.kind),
        "tokens": dict(result.tokens),
        "cost_tokens": result.cost,
        "probes": [{"position": p.position, "confidence": round(p.confidence, 6), "answer": p.answer, "probe_tokens": p.probe_tokens}
                   for p in result.probes],
        "stop_reason": result.stop_reason,
        "stop_position": result.stop_position,
        "wall_time": round(wall_time, 3),
    }


def probe_record(probe: Probe, correct: bool | None, text: bool = True) -> dict[str, Any]:
    """One probe of a trace line (docs/traces.md); ``text``: with the raw probe continuation."""
    line = {"position": probe.position, "confidence": probe.confidence, "answer": probe.answer, "correct": correct,
            "probe_tokens": probe.probe_tokens, "token_logprobs": list(probe.token_logprobs or ())}
    return {**line, "text": probe.text} if text else line


def final_answer(result: Any) -> str | None:
    """What the full reasoning answered: the controller's answer, else the one read from the answer text."""
    return result.answer if result.answer is not None else extract_answer(result.answer_text)


def trace_record(example: Example, result: Any, wall_time: float) -> dict[str, Any]:
    """One trace line (schema 1) from a Vanilla run with a probe at every boundary, and its
    ``reference`` probe at the end of the full reasoning."""
    base = {"schema": TRACE_SCHEMA, "id": example.id, "dataset": example.dataset, "gold": example.gold, "grading": example.kind}
    if isinstance(result, Exception):
        return {**base, "probes": [], "reasoning_tokens": 0, "finish_reason": "error", "error": str(result),
                "final_answer": None, "final_correct": False, "tokens": {}, "wall_time": round(wall_time, 3)}
    final = final_answer(result)
    reference = result.reference
    return {
        **base,
        "probes": [probe_record(p, grade(p.answer, example.gold, example.kind)) for p in result.probes],
        "reasoning_tokens": result.tokens["reasoning"],
        "finish_reason": result.stop_reason,
        "final_answer": final,
        "final_correct": grade(final, example.gold, example.kind),
        **({"reference": probe_record(reference, grade(reference.answer, example.gold, example.kind))} if reference else {}),
        "tokens": dict(result.tokens),
        "wall_time": round(wall_time, 3),
    }


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------


def model_sha256(model: Engine | str) -> str | None:
    """The sha256 of a model that is a local file (hashed once per file version, see
    :func:`codestop.presets.cached_sha256`), a preset's published one (without joining it), else
    None (a hub id or a directory: nothing single to hash)."""
    if isinstance(model, Engine):
        return None
    from codestop.presets import cached_sha256, get_preset

    path = Path(model).expanduser()
    if path.is_file():
        return cached_sha256(path)
    preset = get_preset(model)
    return preset.sha256 if preset is not None else None


def run_config(
    kind: str, dataset: str, model: str, engine_name: str | None, policy: Policy, generation: GenerationConfig,
    prompt: PromptStyle | None = None, sha256: str | None = None, offset: int = 0, split: str | None = None,
) -> dict[str, Any]:
    """What defines a run (a resume must match it), and what produced it. ``offset`` and ``split``
    (a name for the questions chosen, e.g. "held-out") appear only when set, so older run files
    still resume."""
    from codestop import __version__

    chosen: dict[str, Any] = {"offset": offset} if offset else {}
    if split is not None:
        chosen["split"] = split
    return {
        **chosen,
        "kind": kind,
        "schema": RUN_SCHEMA,
        "dataset": dataset,
        "model": model,
        "model_sha256": sha256,
        "engine": engine_name,
        "policy": policy_options(policy),
        "generation": generation.to_dict(),
        "prompt": (prompt or resolve_prompt()).to_config(),
        "codestop_version": __version__,
    }


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


def _load_engine(model: Engine | str, engine: str | None, engine_options: dict[str, Any] | None) -> Engine:
    if isinstance(model, Engine):
        return model
    from codestop.models import load_engine

    return load_engine(model, engine=engine, **(engine_options or {}))


@dataclass
class RunOutcome:
    """What one call of the runner did: the requested questions' records, those answered in this
    session, and the seconds answering them took (model loading excluded)."""

    records: list[dict[str, Any]]
    session: list[dict[str, Any]]
    elapsed: float


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
    offset: int,
    split: str | None,
    concurrency: int,
    engine: str | None,
    engine_options: dict[str, Any] | None,
    progress: bool,
    prompt: PromptStyle,
    log_samples: bool,
) -> RunOutcome:
    """The one runner behind eval and record (which differ in the record they make): the questions
    not yet in ``out`` are answered and appended."""
    examples = load_examples(dataset, data, limit, offset)
    name = examples[0].dataset if examples else (dataset or "")
    model_name = model.model_name if isinstance(model, Engine) else model
    engine_name = model.name if isinstance(model, Engine) else engine
    config = run_config(kind, name, model_name, engine_name, policy, generation, prompt, model_sha256(model), offset, split)
    if kind == "trace":
        config["probe_confidence"] = policy.confidence  # what the stored confidences were scored with
    run = RunFile.open(out, config)
    wanted = {e.id for e in examples}
    todo = [e for e in examples if e.id not in run.done]
    if run.records:
        verb = "eval" if kind == "eval" else "record"
        older = sorted({str((r.get("config") or {}).get("codestop_version")) for r in run.records} - {config["codestop_version"]})
        print(f"codestop {verb}: resuming {run.path} from its {len(run.records)} rows; {len(todo)} of the "
              f"{len(examples)} questions left to answer"
              + (f" (rows written by codestop {', '.join(older)}; new rows record {config['codestop_version']})" if older else ""),
              file=sys.stderr)
    samples = SampleLog.open(samples_path(run.path)) if log_samples else None

    def shown(rec: dict[str, Any]) -> dict[str, Any]:  # what the progress bar counts (a trace: its final answer)
        return rec if kind == "eval" else {"correct": rec.get("final_correct"), "tokens": rec.get("tokens")}

    session: list[dict[str, Any]] = []
    elapsed = 0.0
    if todo:
        eng = _load_engine(model, engine, engine_options)
        # the prompt family of the loaded engine (thinking tags, answer prompt), asking the chosen style
        family = prompt.apply(get_family(generation.family, eng, generation.enable_thinking))
        on_record, close = _progress(len(examples), [shown(r) for r in run.records if r.get("id") in wanted], name, progress)

        def record_done(rec: dict[str, Any]) -> None:
            session.append(rec)
            on_record(shown(rec))

        t0 = time.perf_counter()
        try:
            run_questions(eng, todo, policy, generation, run, make_record, concurrency=concurrency,
                          on_record=record_done, family=family, samples=samples)
        finally:
            elapsed = time.perf_counter() - t0
            close()
    return RunOutcome([r for r in run.records if r.get("id") in wanted], session, elapsed)


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
    prompt: str | PromptStyle | None = None,
    system_prompt: str | None = None,
    log_samples: bool = False,
    offset: int = 0,
    split: str | None = None,
) -> dict[str, Any]:
    """Run ``dataset`` (its first ``limit`` questions after ``offset``) under ``policy``, appending one line per
    question to ``out`` (resuming it when it exists), and return the summary of every line in it
    (see :func:`summarize`; paired against ``baseline`` when given). ``prompt``: a style name or a
    template file (:mod:`codestop.eval.prompts`); ``log_samples``: also write :func:`samples_path`."""
    base_records = read_jsonl(baseline) if baseline is not None else None
    style = prompt if isinstance(prompt, PromptStyle) else resolve_prompt(prompt, system_prompt)
    outcome = _run_dataset(
        "eval", model, dataset, data, limit, out, policy if policy is not None else CodeStop(), generation, eval_record,
        offset=offset, split=split, concurrency=concurrency, engine=engine, engine_options=engine_options, progress=progress,
        prompt=style, log_samples=log_samples,
    )
    return summarize(outcome.records, base_records, session=outcome.session, elapsed=outcome.elapsed)


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
    prompt: str | PromptStyle | None = None,
    system_prompt: str | None = None,
    log_samples: bool = False,
    offset: int = 0,
    split: str | None = None,
) -> list[dict[str, Any]]:
    """Record traces of ``dataset`` into ``out`` (resumable, like :func:`evaluate`): no stopping, a
    probe at every step boundary at least ``generation.probe_interval`` tokens after the last.
    Returns the traces of the requested questions."""
    style = prompt if isinstance(prompt, PromptStyle) else resolve_prompt(prompt, system_prompt)
    return _run_dataset(
        "trace", model, dataset, data, limit, out, Vanilla(), generation.replace(always_probe=True), trace_record,
        offset=offset, split=split, concurrency=concurrency, engine=engine, engine_options=engine_options, progress=progress,
        prompt=style, log_samples=log_samples,
    ).records
