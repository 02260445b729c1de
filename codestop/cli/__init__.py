"""The ``codestop`` command line (:mod:`codestop.cli.main`); nothing else in the package parses one."""

from codestop.cli.main import build_parser, main
from codestop.cli.options import engine_options_from_args

__all__ = ["build_parser", "engine_options_from_args", "main"]
