"""``codestop demo``: vanilla, DEER and CoDE-Stop side by side on built-in word problems."""

from __future__ import annotations

import argparse
import json
from typing import Any

from codestop.demo import DEFAULT_METHODS, DEFAULT_PROBLEMS, DEMO_MAX_REASONING_TOKENS, DEMO_PROBE_INTERVAL, demo
from codestop.errors import CodestopError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="vanilla, DEER and CoDE-Stop side by side on built-in word problems (runs offline)",
        description=(
            "Run vanilla, DEER and CoDE-Stop on the built-in grade-school word problems with a small "
            "model and print accuracy, tokens and time side by side."
        ),
    )
    p.add_argument("--model", default=None, help="preset name, .gguf file, HF directory or hub id (default: the default preset)")
    p.add_argument("--engine", default=None, help="llamacpp or transformers (default: from the model's format)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the free cores)")
    p.add_argument("--family", default=None, help="model family (default: detected)")
    p.add_argument("--problems", type=int, default=DEFAULT_PROBLEMS, help=f"how many problems (default {DEFAULT_PROBLEMS})")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods (default vanilla,deer,codestop)")
    p.add_argument("--max-reasoning-tokens", "--max-new-tokens", dest="max_reasoning_tokens", type=int,
                   default=DEMO_MAX_REASONING_TOKENS, help="reasoning token cap per problem")
    p.add_argument("--probe-interval", type=int, default=DEMO_PROBE_INTERVAL, help="least reasoning tokens between probes")
    p.add_argument("--tau", type=float, default=None, help="CoDE-Stop degeneration threshold")
    p.add_argument("--threshold", type=float, default=None, help="DEER exit threshold")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report (every answer and probe) to FILE")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.json:  # fail before the run, not after it
        try:
            with open(args.json, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise CodestopError(f"json: cannot write {args.json!r} ({err.strerror})") from None
    report = demo(
        args.model,
        problems=args.problems,
        methods=args.methods,
        engine=args.engine,
        threads=args.threads,
        family=args.family,
        max_reasoning_tokens=args.max_reasoning_tokens,
        probe_interval=args.probe_interval,
        tau=args.tau,
        threshold=args.threshold,
    )
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(report.to_dict(), fh, indent=1)
        except OSError as err:
            raise CodestopError(f"json: cannot write {args.json!r} ({err.strerror})") from None
    return 0
