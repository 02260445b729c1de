"""``codestop eval`` and ``codestop record``: a benchmark under a policy; traces for replay."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from codestop.cli.options import (
    add_dataset_options,
    add_generation_options,
    add_model_options,
    add_policy_options,
    add_prompt_options,
    config_from_args,
    engine_options_from_args,
    policy_from_args,
)
from codestop.config import GenerationConfig
from codestop.errors import CodestopError
from codestop.eval.datasets import DATASETS
from codestop.eval.runfiles import samples_path
from codestop.eval.runner import RECORD_GENERATION, RunSpec, evaluate, record
from codestop.eval.summary import print_summary


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="run a benchmark under a stopping policy (resumable JSON lines, summary table)",
        description="Run a benchmark under a stopping policy: one JSON line per question in --out, "
        "resumed when re-run, and a summary table at the end.",
    )
    add_dataset_options(p)
    p.add_argument("--out", required=True, help="the run file (JSON lines); re-running resumes it")
    p.add_argument("--baseline", default=None,
                   help="a vanilla run file: report the saving (1 - cost tokens / the baseline's) and the accuracy change against it")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--log-samples", action="store_true",
                   help="also write OUT's .samples.jsonl: each question, reasoning, answer text, extracted answer, gold, verdict")
    add_model_options(p)
    add_policy_options(p)
    add_prompt_options(p)
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
    r.add_argument("--log-samples", action="store_true",
                   help="also write OUT's .samples.jsonl: each question, reasoning, answer text, extracted answer, gold, verdict")
    add_model_options(r)
    add_prompt_options(r)
    add_generation_options(r, max_reasoning_tokens=RECORD_GENERATION.max_reasoning_tokens, probe_interval=RECORD_GENERATION.probe_interval)
    r.set_defaults(func=cmd_record)


def spec_from_args(args: argparse.Namespace, generation: GenerationConfig, progress: bool) -> RunSpec:
    """The run the dataset, model and prompt flags describe."""
    return RunSpec(
        args.model, args.out, dataset=args.dataset, data=args.data, limit=args.limit, offset=args.offset, split=args.split,
        engine=args.engine, engine_options=engine_options_from_args(args), generation=generation, prompt=args.prompt,
        system_prompt=args.system_prompt, questions_in_flight=args.questions_in_flight, progress=progress, log_samples=args.log_samples,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    if args.dataset is None and args.data is None:
        raise CodestopError("dataset: give --dataset (" + ", ".join(DATASETS) + ") or --data PATH")
    if args.model is None:
        from codestop.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    policy = policy_from_args(args)
    summary = evaluate(spec_from_args(args, config_from_args(args), progress=not args.json), policy=policy, baseline=args.baseline)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, f"{args.dataset or args.data} · {policy.name} · {args.model}")
    if args.log_samples:
        print(f"samples: {samples_path(args.out)}", file=sys.stderr)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    if args.dataset is None and args.data is None:
        raise CodestopError("dataset: give --dataset (" + ", ".join(DATASETS) + ") or --data PATH")
    if args.model is None:
        from codestop.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    t0 = time.perf_counter()
    traces = record(spec_from_args(args, config_from_args(args), progress=True))
    n = len(traces)
    acc = sum(bool(t.get("final_correct")) for t in traces) / n if n else 0.0
    probes = sum(len(t.get("probes", ())) for t in traces) / n if n else 0.0
    length = sum(int(t.get("reasoning_tokens", 0)) for t in traces) / n if n else 0.0
    print(f"{n} traces in {args.out}: final accuracy {acc * 100:.1f}%, {length:.0f} reasoning tokens and "
          f"{probes:.1f} probes per question ({time.perf_counter() - t0:.0f} s this session)")
    return 0
