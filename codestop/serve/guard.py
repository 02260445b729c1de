"""The guard: a stopping policy is either within its stated risk or not running.

It is on with ``--audit-fraction F`` (a policy file's policy, watched) or ``--auto`` (auto mode).
Traffic is cut into segments: the served model name plus an optional client tag (the header
``X-Codestop-Segment`` or the body's ``metadata.codestop_segment``); past ``max_segments`` tags the
new ones share one segment, ``MODEL/other``, so metric labels stay bounded. Each segment has one
state, kept in the store (:mod:`codestop.serve.store`, SQLite in the state dir) and shared by every
worker process:

* ``serving``: requests run the segment's policy; a sample of them is audited
  (:mod:`codestop.serve.audit`) and each audit feeds the segment's watch
  (:class:`codestop.watch.RiskWatch`, an anytime-valid test of changed <= max_risk);
* ``watching`` (auto mode: shadow, collecting traces) and ``reverted`` (after an alarm): requests are
  answered as shadow mode answers them (the upstream alone: no stop, nothing appended), their traces
  recorded in the store (and the ``--shadow`` file when there is one).

The watch's alarm turns a segment to ``reverted`` at once: one warning in the log, ``/health`` and
``/metrics`` say so, and every worker sees it within ``STATE_TTL_S`` (each rereads a segment's state
at most that old). With a policy file the segment stays reverted (a restart with the same file
keeps it so: the state dir remembers); auto mode (:class:`codestop.autopilot.Autopilot`) collects new
traces and calibrates again when its schedule says, serving the next certified setting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from codestop.autopilot import Autopilot
from codestop.controller import Event, Result
from codestop.errors import CodestopError
from codestop.policies import Policy, make_policy
from codestop.serve.audit import Auditor, AuditOutcome
from codestop.serve.protocol import RequestError
from codestop.serve.shadow import Shadow
from codestop.serve.store import Store
from codestop.traces import trace_from_json
from codestop.version import __version__
from codestop.watch import RiskWatch

if TYPE_CHECKING:
    from codestop.engines.base import Engine
    from codestop.serve.metrics import Metrics
    from codestop.serve.options import ServeOptions
    from codestop.serve.serving import Prepared

log = logging.getLogger("codestop.serve")

SEGMENT_HEADER = "x-codestop-segment"
MAX_TAG_CHARS = 64
OTHER_TAG = "other"  # the segment tags past max_segments share
STATE_TTL_S = 0.5  # a worker rereads a segment's state at most this old: a revert reaches every worker within 1 s
STALE_CALIBRATION_S = 600.0  # a calibration claimed longer ago than this (its worker died) may be claimed again
STATES = ("watching", "serving", "reverted")


@dataclass(frozen=True)
class Plan:
    """How one request is answered: in ``shadow`` (the upstream alone, traced), or under ``policy``
    (None: the request's own, as prepared), ``audited`` or not."""

    segment: str
    shadow: bool
    policy: Policy | None = None
    audited: bool = False


def segment_tag(headers: Mapping[str, str], body: Any) -> str | None:
    """The client's segment tag: the header, else ``metadata.codestop_segment``; None when neither.
    One that is not a short printable name is a 400 naming where it came from."""
    where, tag = "header X-Codestop-Segment", headers.get(SEGMENT_HEADER)
    if tag is None:
        metadata = getattr(body, "metadata", None)
        where, tag = "metadata.codestop_segment", metadata.get("codestop_segment") if isinstance(metadata, dict) else None
    if tag is None:
        return None
    if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG_CHARS or not tag.isprintable() or "/" in tag:
        raise RequestError(f"{where}: a segment tag is a printable name of 1 to {MAX_TAG_CHARS} characters without '/'",
                           where.split()[-1])
    return tag


class Guard:
    """Segments, their states in the store, the audits and the watch (see the module docstring)."""

    def __init__(self, options: ServeOptions, shadow: Shadow | None, metrics: Metrics) -> None:
        self.options = options
        self.auto = options.auto
        self.store = Store(options.state_dir)
        self.recorder = shadow if shadow is not None else Shadow(None)  # traces to the store (and the shadow file)
        self.metrics = metrics
        self.fraction = options.audits
        self.auditor = Auditor(self.fraction, self._audited, self._audit_failed)
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._policies: dict[str, Policy] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.add_collector(GuardMetrics(self))

    # -- segments and their states -------------------------------------------------------------

    def segment_of(self, model: str, tag: str | None) -> str:
        if tag is None:
            return model
        name = f"{model}/{tag}"
        if name in self._cache or tag == OTHER_TAG:
            return name
        known = self.store.segments()
        tagged = [s for s in known if "/" in s and not s.endswith("/" + OTHER_TAG)]
        return name if name in known or len(tagged) < self.options.max_segments else f"{model}/{OTHER_TAG}"

    def fresh_state(self) -> dict[str, Any]:
        """A new segment's state: auto mode watches first; a policy file's policy is served, watched."""
        counters = {"epoch": 0, "watch_id": 0, "alarms": 0, "audits": 0, "audits_changed": 0, "audits_failed": 0,
                    "audit_cost_tokens": 0, "saved_cost_tokens": 0, "calibrating": None, "last_watch": None}
        o = self.options
        if self.auto:
            assert o.max_risk is not None and o.alpha is not None
            autopilot = Autopilot(max_risk=o.max_risk, alpha=o.alpha, watch_alpha=o.watch_alpha)
            return {**counters, "mode": "auto", "autopilot": autopilot.to_dict()}
        max_risk, alpha = o.watch_level
        return {**counters, "mode": "policy", "state": "serving", "policy": o.policy_file.to_json(),
                "watch": RiskWatch(max_risk, alpha).to_dict()}

    def _current(self, state: dict[str, Any] | None) -> dict[str, Any]:
        """``state``, or a fresh one where there is none or it was made for another mode or policy
        file (a new policy is watched from the start)."""
        if state is None or state.get("mode") != ("auto" if self.auto else "policy"):
            return self.fresh_state()
        if not self.auto and state.get("policy") != self.options.policy_file.to_json():
            return {**self.fresh_state(), "epoch": state["epoch"] + 1, "watch_id": state["watch_id"] + 1}
        return state

    def state(self, segment: str) -> dict[str, Any]:
        """The segment's state, at most ``STATE_TTL_S`` old (made on first sight)."""
        cached = self._cache.get(segment)
        if cached is not None and time.monotonic() - cached[0] < STATE_TTL_S:
            return cached[1]
        state = self.store.read(segment)
        if state is None or self._current(state) is not state:
            state = self.store.update(segment, self._current)
        self._cache[segment] = (time.monotonic(), state)
        return state

    def _write(self, segment: str, change: Any) -> dict[str, Any]:
        state = self.store.update(segment, lambda s: change(dict(self._current(s))))
        self._cache[segment] = (time.monotonic(), state)
        return state

    def policy_of(self, state: Mapping[str, Any]) -> Policy | None:
        """The policy a serving segment serves (auto mode's certified one; None: the policy file's)."""
        if state["mode"] != "auto":
            return None
        chosen = Autopilot.from_dict(state["autopilot"]).policy
        if not chosen:
            return None
        key = repr(sorted(chosen["policy"].items()))
        if key not in self._policies:
            self._policies[key] = make_policy(chosen["policy"])
        return self._policies[key]

    # -- one request ---------------------------------------------------------------------------

    def plan(self, prep: Prepared, tag: str | None, default: Policy) -> Plan:
        """How to answer ``prep``: shadow while its segment is not serving; else its segment's
        policy, audited by the draw (a request that picked its own knobs runs them, unaudited)."""
        segment = self.segment_of(prep.model, tag)
        state = self.state(segment)
        if state_name(state) != "serving":
            return Plan(segment, shadow=True)
        if prep.policy is not default:
            return Plan(segment, shadow=False)
        return Plan(segment, shadow=False, policy=self.policy_of(state), audited=self.auditor.chosen())

    def traced(self, segment: str, line: dict[str, Any], kind: str = "shadow") -> None:
        """A trace line of the segment into the store; in auto mode, a calibration when it is due."""
        claimed = False

        def count(state: dict[str, Any]) -> dict[str, Any]:
            nonlocal claimed
            if state["mode"] == "auto":
                autopilot = Autopilot.from_dict(state["autopilot"])
                autopilot.traced()
                state["autopilot"] = autopilot.to_dict()
                since = state.get("calibrating")
                if autopilot.due() and (since is None or time.time() - since > STALE_CALIBRATION_S):
                    state["calibrating"], claimed = time.time(), True
            return state

        state = self._write(segment, count)
        self.store.add_trace(segment, state["epoch"], kind, line)
        if claimed:
            task = asyncio.get_running_loop().create_task(self._calibrate(segment, state["epoch"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def sink(self, segment: str) -> Callable[[dict[str, Any]], None]:
        """Where a shadowed request's trace line goes: the segment's traces in the store."""
        return lambda line: self.traced(segment, line)

    async def audit(self, engine: Engine, prep: Prepared, result: Result, policy: Policy, plan: Plan) -> None:
        """Start the audit of an answer its client has now (see :mod:`codestop.serve.audit`): a
        response's background task, run once the response is sent."""
        if plan.audited:
            self.auditor.start(engine, prep, result, policy, plan.segment)

    async def audit_after(self, stream: AsyncGenerator[Event | Result, None], engine: Engine, prep: Prepared, policy: Policy,
                          plan: Plan) -> AsyncGenerator[Event | Result, None]:
        """A streamed answer passed through; its audit starts when the item after its Result is
        asked for: once the chunk that ends the answer has been sent."""
        async with aclosing(stream):
            async for item in stream:
                yield item
                if isinstance(item, Result):
                    await self.audit(engine, prep, item, policy, plan)

    # -- audits and the watch ------------------------------------------------------------------

    def _audited(self, outcome: AuditOutcome) -> None:
        alarm: RiskWatch | None = None
        fed: RiskWatch | None = None

        def feed(state: dict[str, Any]) -> dict[str, Any]:
            nonlocal alarm, fed
            state["audit_cost_tokens"] += outcome.cost_tokens
            state["saved_cost_tokens"] += round(outcome.saved_cost_tokens / self.fraction) if self.fraction else 0
            if state_name(state) != "serving":  # an audit of a setting no longer served: its cost only
                return state
            state["audits"] += 1
            state["audits_changed"] += outcome.changed
            if state["mode"] == "auto":
                autopilot = Autopilot.from_dict(state["autopilot"])
                fed = autopilot.watch
                raised = autopilot.audited(outcome.changed)
                state["autopilot"] = autopilot.to_dict()
            else:
                fed = RiskWatch.from_dict(state["watch"])
                raised = fed.update(outcome.changed)
                state["watch"] = fed.to_dict()
                if raised:
                    state["state"] = "reverted"
            if raised and fed is not None:
                alarm = fed
                state.update(last_watch=fed.to_dict(), alarms=state["alarms"] + 1, epoch=state["epoch"] + 1,
                             watch_id=state["watch_id"] + 1)
            return state

        state = self._write(outcome.segment, feed)
        if fed is not None:
            self.store.add_evalue(outcome.segment, state["watch_id"] - (alarm is not None), fed.n, fed.e_value)
        if outcome.line is not None and alarm is None:
            self.traced(outcome.segment, outcome.line, "audit")  # it feeds the next calibration
        elif outcome.line is not None:  # the traffic that alarmed: not the new traces an alarm starts over on
            self.store.add_trace(outcome.segment, state["epoch"] - 1, "audit", outcome.line)
        if alarm is not None:
            log.warning("codestop guard: segment %s: ALARM after %d audits (%d changed, e-value %.3g >= %.3g): its risk is "
                        "not within changed <= %g; stopping is off, requests are answered as the upstream alone answers them",
                        outcome.segment, alarm.n, alarm.changed, alarm.e_value, alarm.threshold, alarm.max_risk)

    def _audit_failed(self, segment: str) -> None:
        self._write(segment, lambda state: {**state, "audits_failed": state["audits_failed"] + 1})

    # -- auto mode's calibrations --------------------------------------------------------------

    async def _calibrate(self, segment: str, epoch: int) -> None:
        """Calibrate the segment on its traces since the last alarm, and hand the report to its
        autopilot (which serves the setting when one is certified and saves)."""
        report: dict[str, Any] | None = None
        try:
            state = self.store.read(segment) or self.fresh_state()
            autopilot = Autopilot.from_dict(state["autopilot"])
            lines = self.store.traces(segment, epoch)
            report = await asyncio.to_thread(calibrated, lines, autopilot, segment)
        except Exception as err:
            log.warning("codestop guard: segment %s: calibration failed (%s); tried again when next due", segment, err)

        def settle(state: dict[str, Any]) -> dict[str, Any]:
            state["calibrating"] = None
            if report is None or state["epoch"] != epoch or state["mode"] != "auto":
                return state
            autopilot = Autopilot.from_dict(state["autopilot"])
            if autopilot.calibrated(report):
                state["watch_id"] += 1
            state["autopilot"] = autopilot.to_dict()
            return state

        state = self._write(segment, settle)
        if report is not None:
            log.info("codestop guard: segment %s: calibrated on %d traces: %s; now %s", segment, report["n"],
                     report["chosen"]["label"], state_name(state))

    async def aclose(self) -> None:
        await self.auditor.aclose()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()

    @property
    def busy(self) -> bool:
        """Whether an audit or a calibration is running or waiting in this process."""
        return self.auditor.busy or bool(self._tasks)

    # -- what is read of it --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every segment's state, for ``GET /codestop/state`` and the page (the shape the page reads)."""
        return {"version": __version__, "segments": [self.segment_snapshot(name, self._current(state))
                                                     for name, state in self.store.segments().items()]}

    def segment_snapshot(self, segment: str, state: dict[str, Any]) -> dict[str, Any]:
        name = state_name(state)
        watch = watch_of(state)
        policy = guarantee = None
        if name == "serving":
            if state["mode"] == "auto":
                chosen = Autopilot.from_dict(state["autopilot"]).policy or {}
                policy, guarantee = chosen.get("policy"), chosen.get("guarantee")
            else:
                policy, guarantee = self.options.policy_file.policy, self.options.policy_file.guarantee
        shown = shown_watch(state)
        watch_id = state["watch_id"] if watch is not None or not state.get("last_watch") else state["watch_id"] - 1
        n = shown.n if shown else 0
        alpha = shown.alpha if shown else (self.options.watch_alpha or self.options.alpha or 0.05)
        return {
            "segment": segment, "state": name, "traces": self.store.count_traces(segment),
            "policy": policy, "guarantee": guarantee, "saved_cost_tokens": state["saved_cost_tokens"],
            "audits": n, "audits_changed": shown.changed if shown else 0, "audits_failed": state["audits_failed"],
            "audit_cost_tokens": state["audit_cost_tokens"],
            "changed_share": shown.changed / n if shown and n else None,
            "changed_interval": list(shown.interval()) if shown and n else None,
            "e_values": self.store.evalues(segment, watch_id), "alarm_threshold": 1 / alpha,
            "alarmed_at": shown.alarmed_at if shown else None,
        }

    def describe(self) -> dict[str, Any]:
        """The guard for ``/health``: its mode, the audit share, the state dir, each segment's state."""
        o = self.options
        segments = {name: {"state": state_name(s), "alarms": s["alarms"],
                           "e_value": (w.e_value if (w := shown_watch(s)) else None)}
                    for name, s in ((n, self._current(s)) for n, s in self.store.segments().items())}
        return {"mode": "auto" if self.auto else "policy-file", "audit_fraction": self.fraction,
                "state_dir": None if o.state_dir is None else str(o.state_dir), "segments": segments,
                "reverted": sorted(n for n, s in segments.items() if s["state"] == "reverted")}

    def describe_line(self) -> str:
        o = self.options
        if self.auto:
            what = f"auto mode, changed <= {o.max_risk:g} at alpha {o.alpha:g}"
        else:
            max_risk, alpha = o.watch_level
            what = f"the policy file's policy watched at changed <= {max_risk:g}, alpha {alpha:g}"
        states = ", ".join(f"{n}: {state_name(self._current(s))}" for n, s in self.store.segments().items()) or "none yet"
        where = f"state in {o.state_dir}" if o.state_dir is not None else "state in memory"
        return f"guard: {what}; {self.fraction:.0%} of requests audited; {where}; segments: {states}"


def state_name(state: Mapping[str, Any]) -> str:
    if state["mode"] == "auto":
        return str(state["autopilot"]["state"])
    return str(state["state"])


def watch_of(state: Mapping[str, Any]) -> RiskWatch | None:
    """The segment's current watch (None: nothing served, nothing watched)."""
    if state["mode"] == "auto":
        return Autopilot.from_dict(state["autopilot"]).watch if state_name(state) == "serving" else None
    return RiskWatch.from_dict(state["watch"]) if state_name(state) == "serving" else None


def shown_watch(state: Mapping[str, Any]) -> RiskWatch | None:
    """The watch a person is shown: the current one, else the one that alarmed last."""
    return watch_of(state) or (RiskWatch.from_dict(state["last_watch"]) if state.get("last_watch") else None)


def calibrated(lines: Iterable[dict[str, Any]], autopilot: Autopilot, segment: str) -> dict[str, Any]:
    """``codestop calibrate`` on the segment's trace lines (those with a reference answer), at the
    error level this attempt spends."""
    from codestop.analysis.calibrate import calibrate

    traces = [t for i, line in enumerate(lines) if (t := trace_from_json(line, f"{segment}:{i + 1}")).reference_answer is not None]
    if len(traces) < 2:
        raise CodestopError(f"{len(traces)} traces with a reference answer")
    return calibrate(traces, risk=autopilot.risk, max_risk=autopilot.max_risk, alpha=autopilot.attempt_alpha(),
                     seed=autopilot.attempt)


class GuardMetrics:
    """The guard's series, read from the store at each scrape (one state for every worker):
    ``codestop_audits_total``, ``codestop_audits_changed_total``, ``codestop_audit_cost_tokens_total``,
    ``codestop_audits_failed_total``, ``codestop_watch_alarms_total``, ``codestop_guard_state`` (1 for
    the segment's state), ``codestop_watch_e_value`` and ``codestop_segment_traces``, by segment."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {"audits": ("codestop_audits", "Audits (served requests drawn for an audit, watched), by segment."),
                    "audits_changed": ("codestop_audits_changed", "Audits whose answer at the stop changed."),
                    "audit_cost_tokens": ("codestop_audit_cost_tokens", "Cost tokens audits spent continuing stopped requests."),
                    "audits_failed": ("codestop_audits_failed", "Audits that failed or were dropped (counted, not retried)."),
                    "alarms": ("codestop_watch_alarms", "Alarms of the watch (each turned its segment to reverted).")}
        families = {key: CounterMetricFamily(name, text, labels=["segment"]) for key, (name, text) in counters.items()}
        states = GaugeMetricFamily("codestop_guard_state", "The segment's state (1: the one it is in).", labels=["segment", "state"])
        e_value = GaugeMetricFamily("codestop_watch_e_value", "The watch's e-value (alarm at 1/alpha).", labels=["segment"])
        traces = GaugeMetricFamily("codestop_segment_traces", "Trace lines the segment has collected.", labels=["segment"])
        for name, state in self.guard.store.segments().items():
            state = self.guard._current(state)
            for key, family in families.items():
                family.add_metric([name], state[key])
            for s in STATES:
                states.add_metric([name, s], float(state_name(state) == s))
            if (watch := watch_of(state)) is not None:
                e_value.add_metric([name], watch.e_value)
            traces.add_metric([name], self.guard.store.count_traces(name))
        yield from (*families.values(), states, e_value, traces)
