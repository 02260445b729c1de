"""``codestop run``: one question, its reasoning and each probe shown live."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from codestop.cli.options import (
    add_generation_options,
    add_model_options,
    add_policy_options,
    config_from_args,
    engine_from_args,
    policy_from_args,
)
from codestop.errors import CodestopError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="answer one question, showing the reasoning and each probe live",
        description="Answer one question under a stopping policy, streaming the reasoning and each probe.",
    )
    p.add_argument("question", nargs="?", help='the question; "-" reads it from stdin')
    p.add_argument("--file", default=None, help="read the question from this file")
    p.add_argument("--json", action="store_true", help="print one JSON object (the Result) and nothing else on stdout")
    add_model_options(p)
    add_policy_options(p)
    add_generation_options(p)
    p.set_defaults(func=cmd_run)


def _read_question(args: argparse.Namespace) -> str:
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as err:
            raise CodestopError(f"file: cannot read {args.file!r} ({err.strerror})") from None
    elif args.question == "-" or (args.question is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif args.question is None:
        raise CodestopError('question: give a question, "-" to read stdin, or --file F')
    else:
        text = args.question
    if not text.strip():
        raise CodestopError("question: the question is empty")
    return text


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from codestop.api import generate
    from codestop.controller import Event

    question = _read_question(args)
    policy = policy_from_args(args)
    live = not args.json
    config = config_from_args(args, live_text=live)
    if args.model is None:
        from codestop.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    err = Console(stderr=True, highlight=False)
    with err.status(f"loading {args.model} ..."):
        engine = engine_from_args(args)
    out = Console(highlight=False, soft_wrap=True)

    def show(event: Event) -> None:
        if not live:
            return
        if event.kind == "reasoning":
            out.out(event.text, style="dim", end="", highlight=False)
        elif event.kind == "probe" and event.probe is not None:
            p = event.probe
            out.print(
                f"\n  [cyan]probe @ {p.position} tokens: \\boxed{{{_escape(p.answer)}}} confidence {p.confidence:.3f}[/cyan]"
            )
        elif event.kind == "stop":
            out.print(f"\n[bold yellow]stop: {event.reason} at {event.position} reasoning tokens[/bold yellow]")
        elif event.kind == "answer":
            out.out(event.text, end="", highlight=False)

    result = generate(engine, question, policy, config, on_event=show)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    t = result.tokens
    overhead = (t["probe"] / t["reasoning"] * 100) if t["reasoning"] else 0.0
    out.print()
    out.print(f"[bold]answer: {_escape(result.answer or '(none)')}[/bold]")
    out.print(
        f"{t['reasoning']} reasoning + {t['probe']} probe + {t['answer']} answer tokens "
        f"({len(result.probes)} probes, {overhead:.1f}% probe overhead); stop: {result.stop_reason}; "
        f"{result.timings['total']:.1f} s"
    )
    return 0


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
