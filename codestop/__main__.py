"""``python -m codestop``: the command line, run as ``python -m codestop.cli`` runs it (the package
itself never imports the command line: tests/test_layout.py)."""

import runpy

runpy.run_module("codestop.cli", run_name="__main__", alter_sys=True)
