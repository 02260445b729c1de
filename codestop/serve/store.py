"""The guard's state store (:mod:`codestop.serve.guard`): one SQLite database in the state dir
(``--state-dir``), in WAL mode, so that every worker process of one proxy reads and writes one
state per segment, and a restart finds it again. Without a state dir the database is in memory
(one process, lost at exit).

Three tables: ``segments`` (one row per segment: its state as one JSON object, written whole in a
transaction that read it first: two workers' updates never lose one another's), ``traces`` (the
trace lines the segment collected, in the shadow format, by epoch: an alarm starts a new epoch, and
auto mode calibrates on the current epoch's only) and ``evalues`` (the watch's e-value after each
audit, for the page's chart).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from codestop.errors import CodestopError

STORE_FILE = "codestop-state.sqlite"
T = TypeVar("T")
SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (segment TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS traces (seq INTEGER PRIMARY KEY AUTOINCREMENT, segment TEXT NOT NULL, epoch INTEGER NOT NULL,
                                   kind TEXT NOT NULL, line TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS traces_by_segment ON traces (segment, epoch);
CREATE TABLE IF NOT EXISTS evalues (segment TEXT NOT NULL, epoch INTEGER NOT NULL, n INTEGER NOT NULL, e REAL NOT NULL);
CREATE INDEX IF NOT EXISTS evalues_by_segment ON evalues (segment, epoch);
"""


class Store:
    """The state database (``state_dir``/codestop-state.sqlite, or in memory for None). Every call
    is one short transaction under a thread lock; the processes sharing the file wait for each
    other's (SQLite's busy timeout)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None) -> None:
        self.path = None if state_dir is None else Path(state_dir).expanduser() / STORE_FILE
        self._lock = threading.Lock()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path), timeout=30,
                                       isolation_level=None, check_same_thread=False)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commits, never corrupt
            with self._lock:
                self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise CodestopError(f"state dir: cannot open {str(self.path)!r} ({err})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def read(self, segment: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM segments WHERE segment = ?", (segment,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def segments(self) -> dict[str, dict[str, Any]]:
        """Every segment's state, by name."""
        with self._lock:
            rows = self._db.execute("SELECT segment, state FROM segments ORDER BY segment").fetchall()
        return {name: dict(json.loads(state)) for name, state in rows}

    def update(self, segment: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
        """The segment's state replaced by ``change(state)`` (None: no state yet) in one write
        transaction, taken before the read: no other process changes it in between."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT state FROM segments WHERE segment = ?", (segment,)).fetchone()
                state = change(None if row is None else dict(json.loads(row[0])))
                self._db.execute("INSERT OR REPLACE INTO segments (segment, state) VALUES (?, ?)", (segment, json.dumps(state)))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return state

    def add_trace(self, segment: str, epoch: int, kind: str, line: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT INTO traces (segment, epoch, kind, line) VALUES (?, ?, ?, ?)",
                             (segment, epoch, kind, json.dumps(line, ensure_ascii=False)))

    def traces(self, segment: str, epoch: int) -> list[dict[str, Any]]:
        """The segment's trace lines of ``epoch``, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT line FROM traces WHERE segment = ? AND epoch = ? ORDER BY seq",
                                    (segment, epoch)).fetchall()
        return [json.loads(line) for (line,) in rows]

    def count_traces(self, segment: str, epoch: int | None = None) -> int:
        args: list[Any]
        query, args = "SELECT COUNT(*) FROM traces WHERE segment = ?", [segment]
        if epoch is not None:
            query, args = query + " AND epoch = ?", [segment, epoch]
        with self._lock:
            return int(self._db.execute(query, args).fetchone()[0])

    def add_evalue(self, segment: str, epoch: int, n: int, e: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO evalues (segment, epoch, n, e) VALUES (?, ?, ?, ?)", (segment, epoch, n, e))

    def evalues(self, segment: str, epoch: int, most: int = 200) -> list[list[float]]:
        """The e-values of the segment's watch in ``epoch`` as ``[n, e]`` pairs, thinned evenly to
        at most ``most`` (the first and the last always kept)."""
        with self._lock:
            rows = self._db.execute("SELECT n, e FROM evalues WHERE segment = ? AND epoch = ? ORDER BY n",
                                    (segment, epoch)).fetchall()
        return [[int(n), float(e)] for n, e in thinned(rows, most)]


def thinned(points: Sequence[T], most: int) -> list[T]:
    """``points`` thinned evenly to at most ``most`` (at least 2), the first and the last always kept:
    an e-value series for a chart."""
    if len(points) <= most:
        return list(points)
    step = (len(points) - 1) / (most - 1)
    return [points[round(i * step)] for i in range(most)]
