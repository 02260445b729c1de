"""The ``codestop`` command line: a thin layer over the library.

Every verb lives in the module that implements it and registers itself through ``add_parser``;
flags are the Python parameter names in kebab-case. Errors a user can cause print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from codestop.config import add_generation_options
from codestop.errors import CodestopError

__all__ = ["add_generation_options", "add_model_options", "add_policy_options", "main"]

# the modules that add verbs, in the order `codestop --help` lists them
VERB_MODULES = (
    "codestop.cli",  # run
    "codestop.demo",  # demo
    "codestop.evaluate",  # eval, record
    "codestop.replay",  # replay
    "codestop.sweep",  # sweep, calibrate
    "codestop.plots",  # plot, report
    "codestop.serve",  # serve
)


# --------------------------------------------------------------------------------------------
# Shared option groups
# --------------------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=required, help="hub id, local HF directory, .gguf file, or preset name")
    g.add_argument("--engine", default=None, help="transformers, llamacpp or server (default: from the model's format)")
    g.add_argument("--dtype", default="auto", help="transformers dtype: auto, float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="transformers device: auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the free cores)")
    g.add_argument("--base-url", action="append", default=None,
                   help="an OpenAI-compatible completions server (engine server); repeat it for replicas of one "
                        "model: each question stays on one replica, a failed replica is skipped until it is back")
    g.add_argument("--api-key", default=None,
                   help="the completions server's API key (default $CODESTOP_UPSTREAM_API_KEY, else $OPENAI_API_KEY)")
    g.add_argument("--tokenizer", default=None, help="the server model's tokenizer (token-id prompts)")


def add_policy_options(parser: argparse.ArgumentParser, default_method: str = "codestop") -> None:
    """``--method`` and one flag per policy knob, from the policies' own fields."""
    from codestop.policies import METHODS, knob_help, knob_type

    g = parser.add_argument_group("stopping policy")
    g.add_argument("--method", default=default_method, help=", ".join(METHODS))
    for name, help_text in knob_help().items():
        g.add_argument("--" + name.replace("_", "-"), type=knob_type(name), default=None, help=help_text)


def policy_from_args(args: argparse.Namespace) -> Any:
    from codestop.policies import METHOD_OPTIONS, make_policy

    knobs = {k for opts in METHOD_OPTIONS.values() for k in opts}
    return make_policy(args.method, **{k: getattr(args, k, None) for k in knobs})


def engine_from_args(args: argparse.Namespace) -> Any:
    from codestop.models import load_engine

    return load_engine(args.model, engine=args.engine, **engine_options_from_args(args))


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the model flags set (auto values left to the engine)."""
    return {
        k: getattr(args, k)
        for k in ("dtype", "device", "threads", "base_url", "api_key", "tokenizer")
        if getattr(args, k, None) is not None and getattr(args, k) != "auto"
    }


# --------------------------------------------------------------------------------------------
# codestop run
# --------------------------------------------------------------------------------------------


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
    from codestop.config import GenerationConfig
    from codestop.controller import Event

    question = _read_question(args)
    policy = policy_from_args(args)
    live = not args.json
    config = GenerationConfig.from_args(args, live_text=live)
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


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from codestop import __version__

    parser = argparse.ArgumentParser(
        prog="codestop",
        description="Stop reasoning models thinking as soon as more thinking stops paying (CoDE-Stop).",
    )
    parser.add_argument("--version", action="version", version=f"codestop {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        module = sys.modules[__name__] if name == __name__ else importlib.import_module(name)
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CodestopError, ValueError) as err:
        if os.environ.get("CODESTOP_DEBUG"):
            raise
        print(f"codestop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codestop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
