"""The proxy's Prometheus metrics (prometheus_client, one registry per app): requests by endpoint
and status, latency to the last byte, requests in flight, stops by reason, tokens by kind, the
process's own series, and the engine's counters read at each scrape.

Several workers (``codestop serve --workers N``, ``$PROMETHEUS_MULTIPROC_DIR`` set): prometheus_client's
multiprocess mode. Every worker writes its series to files in that directory and a scrape, whichever
worker answers it, sums them (a ``MultiProcessCollector``); each worker's engine counters are added
to counters of the same names after each request and at each scrape. The per-process series
(process_*, python_*) are left out then, as prometheus_client's multiprocess mode does."""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from codestop.controller import Result
from codestop.engines.base import Engine

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}  # what /metrics counts
SAVED_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))


def counter_labels(key: str | tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The labels of one of ``engine.counters()``'s keys: a string is the ``kind`` ("" for none),
    a tuple of (label, value) pairs names its own (several replicas: ``kind`` and ``replica``)."""
    return dict(key) if isinstance(key, tuple) else ({"kind": key} if key else {})


class EngineCounters:
    """Exports ``engine.counters()`` (``{name: {kind: n}}``) as ``codestop_<name>_total{kind}``
    (other labels where a key is a tuple of label pairs, see :func:`counter_labels`), read at each
    scrape so the engine keeps its own counts (none while the engine is being built)."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []  # unknown until scraped: do not call the engine at registration

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        engine = self.engine()
        if engine is None:
            return
        for name, by_key in sorted(engine.counters().items()):
            series = [(counter_labels(key), n) for key, n in by_key.items()]
            names = list(dict.fromkeys(label for labels, _ in series for label in labels))
            family = CounterMetricFamily(f"codestop_{name}", f"{engine.name} engine: {name.replace('_', ' ')}", labels=names)
            for values, n in sorted(([labels.get(k, "") for k in names], n) for labels, n in series):
                family.add_metric(values, n)
            yield family


class UpstreamConnections:
    """``codestop_upstream_connections{state}``: the engine's upstream connections in use and idle,
    read at each scrape (a server engine's; none for an in-process engine). In use with no request
    in flight means a leaked connection."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        connections = getattr(self.engine(), "connections", None)
        if not callable(connections):
            return
        family = GaugeMetricFamily("codestop_upstream_connections", "Upstream connections in the pool, by state "
                                   "(in_use: checked out for a request; idle: kept for the next).", labels=["state"])
        for state, n in sorted(connections().items()):
            family.add_metric([state], n)
        yield family


def multiprocess_dir() -> str | None:
    """The directory the workers share their series in (multiprocess mode), None with one process."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ForgetDeadWorkers:
    """Multiprocess mode, in the process that starts the workers: while it runs (a context), a
    worker that has exited (killed, crashed, restarted by uvicorn) has its live gauges
    (``codestop_requests_in_flight``, ``multiprocess_mode="livesum"``) removed with
    prometheus_client's ``mark_process_dead``, checked every ``every`` seconds; else the requests
    it had in flight would count for good. The directory is this server's alone: a gauge file of a
    process that is not a live child of this one is a dead worker's."""

    def __init__(self, shared: str, every: float = 0.5) -> None:
        self.shared, self.every = shared, every
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="codestop-dead-workers", daemon=True)

    def __enter__(self) -> ForgetDeadWorkers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.forget()

    def forget(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        pids = {int(m.group(1)) for path in glob.glob(os.path.join(self.shared, "gauge_live*_*.db"))
                if (m := re.search(r"_(\d+)\.db$", path))}
        for pid in sorted(pids - {os.getpid()}):
            if not running_child(pid):
                mark_process_dead(pid, self.shared)


def running_child(pid: int) -> bool:
    """Whether ``pid`` is a child of this process that has not exited. It is asked without reaping
    it (``WNOWAIT``): the child stays for its supervisor (uvicorn's) to wait for."""
    if not hasattr(os, "waitid"):  # not on Windows: no worker is forgotten
        return True
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped already, or never a child of this one
        return False


class Metrics:
    """The proxy's series: requests by endpoint and status, latency to the last byte, requests in
    flight, stops by reason, tokens by kind; the process's; the engine's counters."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

        self.engine = engine
        self.shared = multiprocess_dir()
        self.registry = r = CollectorRegistry()
        if self.shared is None:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            r.register(EngineCounters(engine))
            r.register(UpstreamConnections(engine))
        self.collectors: list[Any] = []  # read at each scrape, whatever the mode (add_collector)
        self._engine_series: dict[str, Any] = {}  # multiprocess mode: the engine's counters, by name
        self._synced: dict[tuple[str, tuple[str, ...]], float] = {}  # and what was added to them so far
        self.requests = Counter("codestop_requests", "Requests answered, by endpoint and HTTP status (499: the client left).",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("codestop_request_duration_seconds", "Request latency, to the last byte.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("codestop_requests_in_flight", "Requests being answered now.", registry=r,
                               multiprocess_mode="livesum")
        self.stops = Counter("codestop_stops", "Answers by stop reason.", ["reason"], registry=r)
        self.tokens = Counter("codestop_tokens", "Tokens by kind.", ["kind"], registry=r)
        self.steps = Counter("codestop_reasoning_steps", "Reasoning steps (boundary to boundary) scanned.", registry=r)
        # shadow mode (codestop.serve.shadow): what the request's policy would have done, replayed on its probes
        self.shadow_requests = Counter("codestop_shadow_requests", "Requests answered in shadow (without stopping).", registry=r)
        self.shadow_would_stop = Counter("codestop_shadow_would_stop", "Shadowed requests by the stop reason the policy "
                                         "would have given (none: it would not have stopped).", ["reason"], registry=r)
        self.shadow_reasoning_tokens = Counter("codestop_shadow_reasoning_tokens", "Reasoning tokens of shadowed requests.",
                                               registry=r)
        # saving on the cost basis (docs/vocabulary.md): 1 - cost / vanilla's cost, both replayed on the request's probes
        self.shadow_cost_tokens = Counter("codestop_shadow_cost_tokens", "Cost tokens the policy would have spent on "
                                          "shadowed requests (replayed: the reasoning to its stop and the probes up to it).",
                                          registry=r)
        self.shadow_vanilla_cost_tokens = Counter("codestop_shadow_vanilla_cost_tokens", "Cost tokens of shadowed requests "
                                                  "without stopping (replayed: the full reasoning).", registry=r)
        self.shadow_saving = Histogram("codestop_shadow_saving", "Each shadowed request's saving had the policy run: "
                                       "1 - its cost tokens / vanilla's (le 0: none, or its probes cost more than its "
                                       "stop saved).", buckets=SAVED_BUCKETS, registry=r)
        # the reasoning-token figures these replace, written for one release more (docs/vocabulary.md)
        self.shadow_saved_tokens = Counter("codestop_shadow_saved_reasoning_tokens", "Deprecated (codestop_shadow_cost_tokens): "
                                           "reasoning tokens the policy would have saved on shadowed requests.", registry=r)
        self.shadow_saved = Histogram("codestop_shadow_saved_fraction", "Deprecated (codestop_shadow_saving): share of a "
                                      "shadowed request's reasoning the policy would have saved.", buckets=SAVED_BUCKETS,
                                      registry=r)
        self.shadow_write_errors = Counter("codestop_shadow_write_errors", "Shadow traces that could not be recorded.",
                                           registry=r)

    def add_collector(self, collector: Any) -> None:
        """A collector read at each scrape (one whose series come from state every worker shares, such as
        the guard's store): in multiprocess mode it is added to the merged registry at each scrape."""
        self.collectors.append(collector)
        if self.shared is None:
            self.registry.register(collector)

    def count_result(self, result: Result) -> None:
        self.stops.labels(result.stop_reason).inc()
        self.steps.inc(result.steps)
        for kind, n in result.tokens.items():
            self.tokens.labels(kind).inc(n)

    def sync_engine(self) -> None:
        """Multiprocess mode: add what this worker's engine counted since the last call to the
        shared counters of the same names (the scrape sums the workers')."""
        from prometheus_client import CollectorRegistry, Counter

        engine = self.engine() if self.shared is not None else None
        if engine is None:
            return
        for name, by_key in engine.counters().items():
            for key, n in by_key.items():
                labels = counter_labels(key)
                series = self._engine_series.get(name)
                if series is None:
                    series = self._engine_series[name] = Counter(
                        f"codestop_{name}", f"{engine.name} engine: {name.replace('_', ' ')}", list(labels),
                        registry=CollectorRegistry())  # never rendered itself: the files are
                if set(labels) != set(series._labelnames):
                    continue  # a key with other labels than the first: not exported (no engine has one)
                at = (name, tuple(labels[k] for k in series._labelnames))
                if n > self._synced.get(at, 0.0):
                    child = series.labels(*at[1]) if labels else series
                    child.inc(n - self._synced.get(at, 0.0))
                    self._synced[at] = n

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self.shared is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        self.sync_engine()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.shared)
        for collector in self.collectors:
            merged.register(collector)
        return generate_latest(merged)


class CountRequests:
    """ASGI middleware: counts each answer request once it is over, whatever ended it. The status
    is the response's, or ``state.outcome`` where the handler knows better (a stream that failed
    after its first byte, a client gone); in flight until then, even if a body never started."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        status = 500  # an exception that escapes is answered 500 outside this middleware

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(state.get("outcome", status))).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.sync_engine()
