"""Shadow mode: the proxy answers a request as the upstream alone would, and records what a
stopping policy would have done.

A shadowed request runs with no stopping (the Vanilla policy) and a probe at every step boundary
its config allows (``always_probe``; overlapped beside the reasoning stream by default, so the
client does not wait for the boundary probes), then one ``reference`` probe at the end of the full
reasoning. The client gets the model's full reasoning and its own answer, nothing appended (answer
mode "none": a reasoning cap ends the output, as the upstream's own limit would). One trace line
per request, written by the writer ``codestop record`` uses (:func:`codestop.traces.trace_line`, docs/traces.md; unlabelled: no gold, every
``correct`` null), is appended to the shadow file, and the request's policy is replayed on its
probes (:func:`codestop.replay.replay_trace`) for ``/metrics``: where it would have stopped and what
it would have saved (cost tokens against the same trace replayed without stopping).

Without ``text`` a line holds no prompt, reasoning or answer text: ids, positions, confidences,
probe answers, answer-token log-probabilities, token counts (what replay and calibration read).

Appends are one ``write`` of one whole line, under a lock (a thread lock, and ``flock`` for other
worker processes), to a file opened ``O_APPEND``: concurrent requests never interleave, and a
killed proxy loses at most the line being written (readers drop a cut last line and name it; the
next start cuts it off before appending).

Which requests are shadowed: each with probability ``fraction``, drawn from ``random.Random(seed)``
in the order requests arrive (seeded, so a run of the same traffic picks the same requests).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codestop.config import GenerationConfig
from codestop.controller import Event, Result
from codestop.errors import CodestopError
from codestop.jsonl import end_cleanly
from codestop.policies import Policy, Vanilla, policy_options
from codestop.replay import Replayed, replay_trace
from codestop.traces import TRACE_SCHEMA, trace_from_json, trace_line
from codestop.version import __version__

if TYPE_CHECKING:
    from codestop.serve.metrics import Metrics
    from codestop.serve.serving import Prepared

try:
    import fcntl
except ImportError:  # not on Windows: the thread lock alone (one process)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("codestop.serve")

SHADOW_POLICY = Vanilla()


class Shadow:
    """The shadow file and the draw of which requests it records (``fraction`` in (0, 1], checked
    with the other :class:`~codestop.serve.options.ServeOptions`). ``path`` None: no file (the
    guard's shadow, whose traces go to its store alone)."""

    def __init__(self, path: str | os.PathLike[str] | None, fraction: float = 1.0, text: bool = False, seed: int = 0) -> None:
        self.path = None if path is None else Path(path).expanduser()
        self.fraction = float(fraction)
        self.text = bool(text)
        self._draw = random.Random(seed)
        self._lock = threading.Lock()
        if self.path is None:
            return
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise CodestopError(f"shadow: cannot append to {str(self.path)!r} ({err.strerror})") from None
        try:
            if fcntl is not None:  # another worker may be appending: never cut its line half-written
                fcntl.flock(fd, fcntl.LOCK_EX)
            end_cleanly(self.path)  # a line cut by a killed proxy is dropped (saying so), not appended to
        finally:
            os.close(fd)

    def describe(self) -> str:
        share = "every request" if self.fraction >= 1 else f"{self.fraction:.0%} of requests"
        return f"shadow: {share} answered without stopping, traces appended to {self.path}" + (" (with texts)" if self.text else "")

    def chosen(self) -> bool:
        """Whether the next request is shadowed."""
        return self.fraction >= 1 or self._draw.random() < self.fraction

    @staticmethod
    def config(config: GenerationConfig) -> GenerationConfig:
        """A shadowed request's config: probes at its boundaries, nothing appended after the reasoning."""
        return config.replace(always_probe=True, answer="none")

    async def watch(self, stream: AsyncGenerator[Event | Result, None], prep: Prepared, policy: Policy,
                    metrics: Metrics, sink: Callable[[dict[str, Any]], None] | None = None) -> AsyncGenerator[Event | Result, None]:
        """``stream`` passed through; its Result, before it is passed on, is appended as a trace line
        (to the file, and to ``sink``: the guard's store) and ``policy`` replayed on it into
        ``metrics``. A request that ends without a Result (the client gone, a failure) leaves no line."""
        t0 = time.perf_counter()
        async with aclosing(stream):
            async for item in stream:
                if isinstance(item, Result):
                    try:
                        self.record(item, prep, policy, metrics, time.perf_counter() - t0, sink)
                    except Exception:  # the client's answer is ready: shadowing never costs it
                        metrics.shadow_write_errors.inc()
                        log.exception("shadow: the trace of %s could not be recorded", prep.rid)
                yield item

    def record(self, result: Result, prep: Prepared, policy: Policy, metrics: Metrics, wall_time: float,
               sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        line = self.line(result, prep, wall_time)
        try:
            trace = trace_from_json(line, f"shadow {prep.rid}")
        except CodestopError:  # no reasoning at all (no probe, no answer): nothing a reader could score
            metrics.shadow_requests.inc()
            metrics.shadow_would_stop.labels("none").inc()
            return
        try:
            if self.path is not None:
                self.append(line)
        except OSError as err:  # the client's answer does not fail for it
            metrics.shadow_write_errors.inc()
            log.error("shadow: cannot append to %s (%s); the trace of %s is lost", self.path, err.strerror, prep.rid)
        if sink is not None:
            sink(line)
        count_replayed(metrics, replay_trace(trace, policy), replay_trace(trace, SHADOW_POLICY), result.tokens["reasoning"])

    def line(self, result: Result, prep: Prepared, wall_time: float) -> dict[str, Any]:
        """The request's trace line (docs/traces.md), unlabelled."""
        texts = {"prompt": prep.prompt, "reasoning": result.reasoning_text, "answer_text": result.answer_text} if self.text else None
        line = trace_line(result, id=prep.rid, dataset="shadow", wall_time=wall_time, probe_text=self.text, texts=texts)
        return {**line, "config": self.run_config(result, prep)}

    @staticmethod
    def run_config(result: Result, prep: Prepared) -> dict[str, Any]:
        return {"kind": "shadow", "schema": TRACE_SCHEMA, "model": result.model, "engine": result.engine,
                "family": result.family, "policy": policy_options(SHADOW_POLICY), "would_apply": policy_options(prep.policy),
                "generation": Shadow.config(prep.config).to_dict(), "probe_confidence": SHADOW_POLICY.confidence,
                "codestop_version": __version__}

    def append(self, line: dict[str, Any]) -> None:
        """One whole line in one write, under the thread lock and an exclusive ``flock``."""
        assert self.path is not None
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                written = 0
                while written < len(data):  # a regular file takes it whole; a short write continues it
                    written += os.write(fd, data[written:])
            finally:
                os.close(fd)  # closing releases the flock


def count_replayed(metrics: Metrics, replayed: Replayed, vanilla: Replayed, full_reasoning: int) -> None:
    """One shadowed request in ``/metrics``: where the policy would have stopped, what it would have
    cost against ``vanilla`` (the same trace replayed without stopping), and (for one release more)
    the reasoning tokens it would have saved."""
    saved = max(0, full_reasoning - replayed.reasoning_tokens) if replayed.stop_index is not None else 0
    metrics.shadow_requests.inc()
    metrics.shadow_would_stop.labels(replayed.stop_reason or "none").inc()
    metrics.shadow_reasoning_tokens.inc(full_reasoning)
    metrics.shadow_cost_tokens.inc(replayed.cost_tokens)
    metrics.shadow_vanilla_cost_tokens.inc(vanilla.cost_tokens)
    metrics.shadow_saving.observe(1 - replayed.cost_tokens / vanilla.cost_tokens if vanilla.cost_tokens else 0.0)
    metrics.shadow_saved_tokens.inc(saved)
    metrics.shadow_saved.observe(saved / full_reasoning if full_reasoning else 0.0)
