"""Which test killed pytest? Read from a test log that ends in a native crash.

A signal from native code (SIGILL, SIGSEGV) ends pytest without its summary. pytest's faulthandler
plugin prints "Fatal Python error: <signal>" and every thread's Python stack first, so the test
function is in the log. ``.ci/run`` calls ``python tests/crash_report.py LOG EXIT_STATUS`` and
prints the one line this writes (nothing when the run did not die by a signal).
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

# not anchored: pytest -q prints its progress dots on the same line
FATAL = re.compile(r"Fatal Python error: (.+?)\s*$", re.M)
FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)', re.M)
# faulthandler's names for the signals it handles
NAMES = {
    "Illegal instruction": signal.SIGILL,
    "Segmentation fault": signal.SIGSEGV,
    "Floating-point exception": signal.SIGFPE,
    "Floating point exception": signal.SIGFPE,
    "Bus error": signal.SIGBUS,
    "Aborted": signal.SIGABRT,
}


def _test_id(path: str, func: str) -> str:
    parts = Path(path).parts
    rel = "/".join(parts[parts.index("tests") :]) if "tests" in parts else Path(path).name
    return f"{rel}::{func}"


def describe(log: str, exit_status: int) -> str | None:
    """``pytest died by signal N (NAME) in tests/test_x.py::test_y (line L)``, or None when neither
    the exit status (a shell's 128+N, or subprocess's -N) nor the log says a signal ended the run."""
    fatal = list(FATAL.finditer(log))
    signum = -exit_status if exit_status < 0 else exit_status - 128 if exit_status > 128 else 0
    if not signum and fatal:
        signum = int(NAMES.get(fatal[-1].group(1), 0))
    if not signum and not fatal:
        return None
    name = f" ({signal.Signals(signum).name})" if signum in signal.Signals._value2member_map_ else ""
    what = f"signal {signum}{name}" if signum else f"a fatal error ({fatal[-1].group(1)})"
    where = "an unknown test (no faulthandler stack in the log)"
    if fatal:
        # the stacks after the last fatal error: every thread's; the first test function wins
        for frame in FRAME.finditer(log, fatal[-1].end()):
            if Path(frame["file"]).name.startswith("test_") and frame["func"].startswith("test"):
                where = f"{_test_id(frame['file'], frame['func'])} (line {frame['line']})"
                break
    return f"pytest died by {what} in {where}"


if __name__ == "__main__":
    line = describe(Path(sys.argv[1]).read_text(encoding="utf-8", errors="replace"), int(sys.argv[2]))
    if line:
        print(f"== {line}")
