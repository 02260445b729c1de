"""``codestop demo``: vanilla, DEER and CoDE-Stop side by side on a few word problems.

With no arguments it runs the default preset (a small instruct model that installs from PyPI) on
the built-in grade-school word problems (``demo_problems.json``, written for this demo), shows a
progress bar, and ends with one table: accuracy, mean reasoning tokens, tokens saved against
vanilla, what the probes cost, and wall time. Every method answers the same problems greedily, so
the differences come from when each one stops.

Each method runs through the eval runner and is graded by the eval grader (the golds are integers).
The demo's settings were chosen by measurement on a 2-core CPU (see
:data:`codestop.eval.prompts.SOLVE_THEN_CHECK`): the
preset models are instruct models, not reasoning models, so their whole answer is the "reasoning"
(family ``plain``), a blank line ends a step, and the prompt asks them to solve and then check the
answer, as reasoning models do by themselves. A model with thinking markers (``--model`` a Qwen3,
an R1 distill, ...) keeps its own family's prompt and boundaries.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any

from codestop.engines.base import Engine
from codestop.eval.datasets import Example
from codestop.eval.prompts import SOLVE_THEN_CHECK
from codestop.eval.runner import eval_record, run_questions
from codestop.policies import MODEL_ENDED

DEFAULT_METHODS = ("vanilla", "deer", "codestop")
DEFAULT_PROBLEMS = 6  # 6 x 3 runs: 4.2 min on 2 idle cores (8 took 5.2 min, 12 took 7.9 min)
DEMO_MAX_REASONING_TOKENS = 500  # vanilla answers these in ~150-450 tokens; the cap bounds a runaway
# Probes at blank lines at least 128 reasoning tokens apart: the first probe then comes after the
# solution, not inside it (24 problems: vanilla 46% / 339 tokens; CoDE-Stop 50% / 199; DEER 54% /
# 219; probing every 16-64 tokens stopped on intermediate results: 21-38%).
DEMO_PROBE_INTERVAL = 128


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """The built-in problems (package data), the first ``limit`` of them."""
    text = resources.files("codestop").joinpath("demo_problems.json").read_text(encoding="utf-8")
    problems = [Problem(p["question"], str(p["answer"])) for p in json.loads(text)["problems"]]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"problems: {limit!r} must be >= 1")
        if limit > len(problems):
            raise ValueError(f"problems: {limit} asked, the demo has {len(problems)}")
        problems = problems[:limit]
    return problems


def demo_record(example: Example, result: Any, wall_time: float) -> dict[str, Any]:
    """An eval line (graded by the eval grader, the golds being integers) with what the demo's
    report also shows: the question, the reasoning text and the time of each phase."""
    if isinstance(result, Exception):
        raise result  # the demo has no run file to record an error in: say it
    return {**eval_record(example, result, wall_time), "question": example.question,
            "reasoning_text": result.reasoning_text, "timings": result.timings}


@dataclass
class MethodSummary:
    method: str
    problems: int
    correct: int
    reasoning_tokens: float  # mean per problem
    cost_tokens: float  # mean reasoning + probe + answer tokens (the paper's accounting)
    probe_tokens: float  # mean probe tokens generated
    probe_count: float  # mean probes per problem (``probes`` is the list of a result's probes)
    probe_seconds: float  # total time in probes
    wall_seconds: float  # total time for the method
    stop_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else 0.0

    @property
    def probe_overhead(self) -> float:
        """Share of the wall time spent probing."""
        return self.probe_seconds / self.wall_seconds if self.wall_seconds else 0.0


@dataclass
class DemoReport:
    model: str
    engine: str
    summaries: list[MethodSummary]
    results: dict[str, list[dict[str, Any]]]
    load_seconds: float
    wall_seconds: float
    engine_build: str = ""  # e.g. the llama.cpp build and its CPU kernels: greedy answers depend on it

    def saving(self, summary: MethodSummary) -> float | None:
        """1 - this method's mean cost tokens / vanilla's (reasoning + probe + answer tokens)."""
        base = next((s for s in self.summaries if s.method == "vanilla"), None)
        if base is None or base.cost_tokens == 0:
            return None
        return 1.0 - summary.cost_tokens / base.cost_tokens

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"codestop demo: {self.model} ({self.engine}), {self.summaries[0].problems} problems")
        for name, justify in (
            ("method", "left"),
            ("accuracy", "right"),
            ("reasoning tokens", "right"),
            ("saving vs vanilla", "right"),
            ("probe overhead", "right"),
            ("stops", "left"),
            ("wall time", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for s in self.summaries:
            saved = self.saving(s)
            table.add_row(
                s.method,
                f"{s.accuracy * 100:.0f}%",
                f"{s.reasoning_tokens:.0f}",
                "-" if saved is None or s.method == "vanilla" else f"{saved * 100:.0f}%",
                "-" if not s.probe_count else f"{s.probe_tokens:.0f} tok, {s.probe_overhead * 100:.0f}% time",
                ", ".join(f"{reason} {n}" for reason, n in sorted(s.stop_reasons.items(), key=lambda kv: -kv[1])),
                f"{s.wall_seconds:.0f} s",
            )
        table.caption = (
            "Per problem: mean reasoning tokens; saving = 1 - cost tokens (reasoning + probe + answer) / "
            "vanilla's; probe overhead = probe tokens, share of wall time. The presets are instruct models, "
            "not reasoning models: the demo prompt asks them to solve, then check the answer. Stops: "
            "confident / degenerate (CoDE-Stop), threshold (DEER), finished (the model ended itself; "
            "unclosed_thinking: it ended its turn inside its thinking), "
            "max_reasoning_tokens (the cap)."
            + self.same_stops_note()
        )
        return table

    def same_stops_note(self) -> str:
        """Say so when DEER and CoDE-Stop stopped at the same place on every problem: then the
        degeneration score added nothing on these problems, and the two rows cannot differ."""
        stops = {m: [(r["stop_reason"] not in MODEL_ENDED, r["tokens"]["reasoning"]) for r in rows] for m, rows in self.results.items()}
        if "deer" in stops and "codestop" in stops and stops["deer"] == stops["codestop"]:
            return (" Here DEER and CoDE-Stop stopped at the same probe on every problem: on these short "
                    "answers the confidence threshold fires before the degeneration score can.")
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "engine": self.engine,
            "engine_build": self.engine_build,
            "load_seconds": self.load_seconds,
            "wall_seconds": self.wall_seconds,
            "methods": [
                {
                    **asdict(s),
                    "accuracy": s.accuracy,
                    "probe_overhead": s.probe_overhead,
                    "saving": self.saving(s),
                    "probes": s.probe_count,  # the old name of probe_count, until the next release
                }
                for s in self.summaries
            ],
            "results": self.results,
        }


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    from codestop.policies import METHODS

    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise ValueError("methods: give at least one method, e.g. vanilla,deer,codestop")
    for name in names:
        if name not in METHODS:
            raise ValueError(f"methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods: {','.join(names)} names a method twice")
    return names


def demo(
    model: str | Engine | None = None,
    *,
    problems: int | None = DEFAULT_PROBLEMS,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    engine: str | None = None,
    threads: int | None = None,
    family: str | None = None,
    max_reasoning_tokens: int = DEMO_MAX_REASONING_TOKENS,
    probe_interval: int = DEMO_PROBE_INTERVAL,
    tau: float | None = None,
    threshold: float | None = None,
    show: bool = True,
    console: Any = None,
) -> DemoReport:
    """Run ``methods`` on the first ``problems`` built-in word problems and return the report
    (printing a progress bar and the table when ``show``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from codestop.config import GenerationConfig
    from codestop.families import get_family
    from codestop.models import DEFAULT_MODEL, load_engine
    from codestop.policies import make_policy

    names = parse_methods(methods)
    items = load_problems(problems)
    out = console or Console(highlight=False)
    policies = {}
    for name in names:
        options: dict[str, Any] = {}
        if name == "codestop" and tau is not None:
            options["tau"] = tau
        if name == "deer" and threshold is not None:
            options["threshold"] = threshold
        policies[name] = make_policy(name, **options)

    t_load = time.perf_counter()
    if model is None or isinstance(model, str):
        name = model or DEFAULT_MODEL
        options = {"threads": threads} if threads is not None else {}
        if show:
            with out.status(f"loading {name} (a preset is joined and checked once, then reused) ..."):
                eng = load_engine(name, engine=engine, **options)
        else:
            eng = load_engine(name, engine=engine, **options)
    else:
        eng = model
    load_seconds = time.perf_counter() - t_load
    fam = get_family(family, eng)
    if fam.name == "plain":
        fam = replace(fam, instruction=SOLVE_THEN_CHECK)
    # greedy, the default step boundaries (a blank line, "Wait", ...)
    config = GenerationConfig(max_reasoning_tokens=max_reasoning_tokens, probe_interval=probe_interval, temperature=0.0)

    summaries: list[MethodSummary] = []
    results: dict[str, list[dict[str, Any]]] = {}
    t_all = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=out,
        disable=not show,
        transient=False,
    )
    examples = [Example(str(i), p.question, p.answer, "integer", "demo") for i, p in enumerate(items, start=1)]
    with progress:
        tasks = {n: progress.add_task(n, total=len(items), status="") for n in names}
        for method in names:
            rows: list[dict[str, Any]] = []

            def done(row: dict[str, Any], task: Any = tasks[method], rows: list[dict[str, Any]] = rows) -> None:
                rows.append(row)
                progress.update(task, advance=1, status=f"{sum(r['correct'] for r in rows)}/{len(rows)} right")

            t_method = time.perf_counter()
            run_questions(eng, examples, policies[method], config, None, demo_record, on_record=done, family=fam)
            wall = time.perf_counter() - t_method
            n = len(rows)
            summaries.append(
                MethodSummary(
                    method=method,
                    problems=n,
                    correct=sum(r["correct"] for r in rows),
                    reasoning_tokens=sum(r["tokens"]["reasoning"] for r in rows) / n,
                    cost_tokens=sum(r["cost_tokens"] for r in rows) / n,
                    probe_tokens=sum(r["tokens"]["probe"] for r in rows) / n,
                    probe_count=sum(len(r["probes"]) for r in rows) / n,
                    probe_seconds=sum(r["timings"]["probe"] for r in rows),
                    wall_seconds=wall,
                    stop_reasons=dict(Counter(r["stop_reason"] for r in rows)),
                )
            )
            results[method] = rows
    report = DemoReport(
        model=eng.model_name,
        engine=eng.name,
        summaries=summaries,
        results=results,
        load_seconds=load_seconds,
        wall_seconds=time.perf_counter() - t_all,
        engine_build=str(getattr(eng, "build_info", "")),
    )
    if show:
        out.print(report.table())
        out.print(f"total {report.wall_seconds + load_seconds:.0f} s (loading {load_seconds:.0f} s)")
        if report.engine_build:
            out.print(f"engine: {report.engine_build} (greedy answers can differ on another build: README, \"The demo\")")
    return report
