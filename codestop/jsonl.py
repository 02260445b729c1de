"""JSON-lines files (run files, trace files): read tolerant of a killed writer, never silently.

Engine-free, so that replay and the figures read trace files without loading a model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError


def read_numbered(path: str | os.PathLike[str], repair: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each JSON object of a run or trace file, blank lines skipped.

    A last line that does not parse (cut short by a killed writer) is dropped with a warning on
    stderr naming it; with ``repair`` the file is also truncated to its last complete line, so
    appending continues cleanly. A bad line anywhere else raises an error naming the file and line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise CodestopError(f"file: cannot read {str(p)!r} ({err.strerror})") from None
    lines = raw.split(b"\n")
    records: list[tuple[int, dict[str, Any]]] = []
    good_end = 0  # bytes of the file that hold complete, valid lines
    for n, line in enumerate(lines, start=1):
        is_last = n == len(lines) or (n == len(lines) - 1 and lines[-1] == b"")
        if line.strip():
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("a JSON value that is not an object")
            except (ValueError, UnicodeDecodeError) as err:
                if is_last:  # half-written by a killed run
                    then = "it is removed and its question redone" if repair else "it is ignored"
                    print(f"codestop: warning: {p}:{n}: the last line is not a complete JSON object "
                          f"(a killed run?); {then}", file=sys.stderr)
                    break
                raise CodestopError(f"file: {p}:{n}: not a valid JSON object ({err}); fix or delete that line") from None
            records.append((n, obj))
        good_end = min(good_end + len(line) + 1, len(raw))
    if repair:
        if good_end < len(raw):
            with open(p, "r+b") as fh:
                fh.truncate(good_end)
        elif raw and not raw.endswith(b"\n"):
            with open(p, "ab") as fh:  # a complete last line that lost only its newline
                fh.write(b"\n")
    return records


def read_jsonl(path: str | os.PathLike[str], repair: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a run or trace file, one per line (see :func:`read_numbered`)."""
    return [obj for _, obj in read_numbered(path, repair)]


def end_cleanly(path: str | os.PathLike[str]) -> None:
    """Make ``path`` end with a whole line before appending to it: a last line cut short by a killed
    writer is cut off (with a warning naming it), a whole one that lost only its newline gets it
    back. Only the tail is read, so a large file costs nothing."""
    p = Path(path)
    with open(p, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        start, block = size, 1 << 16
        while start > 0:  # back to the newline before the last line
            start = max(0, start - block)
            fh.seek(start)
            chunk = fh.read(size - start)
            at = chunk.rfind(b"\n")
            if at != -1:
                start += at + 1
                break
        fh.seek(start)
        tail = fh.read()
        try:
            whole = isinstance(json.loads(tail), dict)
        except (ValueError, UnicodeDecodeError):
            whole = False
        if whole:
            fh.write(b"\n")
            return
        print(f"codestop: warning: {p}: the last line (bytes {start}-{size}) is not a complete JSON object "
              "(a killed writer?); it is removed", file=sys.stderr)
        fh.truncate(start)
