"""``codestop demo``: vanilla, DEER and CoDE-Stop side by side on built-in word problems."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, cast

from codestop.demo import DEFAULT_METHODS, DEFAULT_PROBLEMS, DEMO_MAX_REASONING_TOKENS, DEMO_PROBE_INTERVAL, DemoReport, demo
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
    p.add_argument("--json", nargs="?", const=True, default=None, metavar="FILE",
                   help="print the report (every answer and probe) as one JSON object on stdout, the table on stderr; "
                        "--json FILE, its old form, writes FILE as --out does (deprecated)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the report (every answer and probe) to FILE as JSON")
    p.set_defaults(func=cmd_demo)


def report_file(args: argparse.Namespace) -> str | None:
    """The file the report is written to: ``--out``, or the old ``--json FILE`` (one deprecation
    line: every other verb's ``--json`` prints)."""
    if isinstance(args.json, str):
        print(f"codestop: demo --json FILE is deprecated; use --out {args.json} (--json alone prints the report)", file=sys.stderr)
        if args.out is not None:
            raise CodestopError("out: give --out FILE or the old --json FILE, not both")
        return args.json
    return cast(str | None, args.out)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    path = report_file(args)
    if path:  # fail before the run, not after it
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise CodestopError(f"out: cannot write {path!r} ({err.strerror})") from None
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
        console=Console(stderr=True, highlight=False) if args.json is True else None,  # stdout holds the JSON alone
    )
    emit(report, args.json is True, path)
    return 0


def emit(report: DemoReport, printed: bool, path: str | None) -> None:
    """The report as JSON: printed on stdout, written to ``path``, both or neither."""
    if printed:
        print(json.dumps(report.to_dict(), indent=1))
    if path:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(report.to_dict(), fh, indent=1)
        except OSError as err:
            raise CodestopError(f"out: cannot write {path!r} ({err.strerror})") from None
