"""The ``codestop`` command line: a thin layer over the library.

One module per verb (``codestop.cli.run``, ...) adds its parser and calls the library function of
the same name; flags shared by several verbs are in :mod:`codestop.cli.options`. Errors a user can
cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from collections.abc import Sequence

from codestop.cli import calibrate, demo, eval, plot, replay, run, serve, sweep
from codestop.errors import CodestopError, redact

# in the order `codestop --help` lists them
VERBS = (run, demo, eval, replay, sweep, calibrate, plot, serve)


def build_parser() -> argparse.ArgumentParser:
    from codestop.version import __version__

    parser = argparse.ArgumentParser(
        prog="codestop",
        description="Stop reasoning models thinking as soon as more thinking stops paying (CoDE-Stop).",
    )
    parser.add_argument("--version", action="version", version=f"codestop {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in VERBS:
        module.add_parser(sub)
    return parser


def enable_crash_traces() -> None:
    """A crash in native code (llama.cpp, torch: SIGILL, SIGSEGV) ends the process by a signal no
    Python code can catch; faulthandler prints "Fatal Python error: <the signal>" and every thread's
    Python stack (which names the engine call) on its way out, instead of nothing. A handler cannot
    run Python, so what to do is in docs/native.md. Child interpreters (serve's workers, the
    llama.cpp check) inherit it through PYTHONFAULTHANDLER."""
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    if not faulthandler.is_enabled():
        faulthandler.enable()


def main(argv: Sequence[str] | None = None) -> int:
    enable_crash_traces()
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
        print(f"codestop: error: {redact(str(err))}", file=sys.stderr)  # a configured key is never echoed
        return 2
    except KeyboardInterrupt:
        print("codestop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
