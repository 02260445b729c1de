"""Auto mode's state machine for one segment: shadow until a calibration certifies a saving setting,
serve it under audit and the watch, back to shadow on an alarm. Pure: no I/O (the proxy persists
:meth:`Autopilot.to_dict` and feeds it traces, calibrations and audits).

States (``STATES``):

* ``watching``: shadow (no stopping), collecting traces; :meth:`Autopilot.due` says when a calibration
  is due; :meth:`Autopilot.calibrated` takes its report and switches to ``serving`` when the chosen
  setting is certified and saves (vanilla never serves);
* ``serving``: the certified setting runs, a sample of its requests is audited, each audit outcome goes
  to :meth:`Autopilot.audited` and so to a fresh :class:`codestop.watch.RiskWatch` at ``max_risk`` and
  ``watch_alpha`` (default ``alpha``). Audits are traces too, and calibrations stay due on the schedule:
  a later one that certifies a setting saving more replaces the served one (with a fresh watch);
* ``reverted``: the watch alarmed: shadow again, collecting traces; the traces before the alarm are
  never used again (the schedule starts over on new ones), and the next certification serves as from
  ``watching``.

The schedule: attempt k (1, 2, ...) runs at ``next_calibration_at`` traces since the last alarm: the
first at the least number whose testing part (after calibrate's ordering split) could certify
``max_risk`` at attempt 1's level even with no loss (:func:`first_calibration_at`), each later one when
the traces have doubled (or more, if attempt k's smaller level needs more).

The error spending (the whole run's guarantee, docs/calibration.md): attempt k runs Learn-then-Test at
``alpha * 6 / (pi^2 k^2)`` (:func:`attempt_alpha`); these sum to ``alpha`` over all attempts the run
could ever make, after alarms too (the attempt count never restarts), so by the union bound, with
probability at least 1 - alpha every setting the run ever serves was certified truly for the traffic
its calibration traces came from. The watch adds the other half of the promise: if the traffic then
moves away from them, it alarms (and the setting stops) with the power its audits give, and it alarms
falsely with probability at most ``watch_alpha`` per served setting (costing savings, never answers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from codestop.analysis.calibrate import DEFAULT_ORDERING_FRACTION, calibrate, saving_of
from codestop.analysis.risk import min_certifiable_n
from codestop.errors import ParameterError, is_integer
from codestop.policy_file import RISKS
from codestop.traces import Trace
from codestop.watch import RiskWatch, check_fraction

STATES = ("watching", "serving", "reverted")


def attempt_alpha(alpha: float, attempt: int) -> float:
    """The error level attempt ``attempt`` (1, 2, ...) spends: alpha 6 / (pi^2 k^2), summing to alpha."""
    return alpha * 6.0 / (math.pi ** 2 * attempt ** 2)


def calibration_size(max_risk: float, alpha: float, ordering_fraction: float = DEFAULT_ORDERING_FRACTION) -> int:
    """The least number of traces whose testing part (calibrate's split: ``round(n * ordering_fraction)``
    order, the rest test) can certify ``max_risk`` at ``alpha`` at all."""
    need = min_certifiable_n(max_risk, alpha)
    n = need + 1
    while n - min(n - 1, max(1, round(n * ordering_fraction))) < need:
        n += 1
    return n


def first_calibration_at(max_risk: float, alpha: float) -> int:
    """When attempt 1 runs: the least number of traces that could certify at its level."""
    return calibration_size(max_risk, attempt_alpha(alpha, 1))


@dataclass
class Autopilot:
    """One segment's auto mode (module docstring); every field JSON-ready, :meth:`to_dict` /
    :meth:`from_dict` round-trip exactly, so a restart resumes where it was."""

    max_risk: float
    alpha: float
    risk: str = "changed"
    watch_alpha: float | None = None
    state: str = "watching"
    attempt: int = 0  # calibrations run so far (never restarts: the error spending counts them all)
    next_calibration_at: int = 0  # traces since the last alarm at which the next calibration is due (0: the first)
    traces_since_alarm: int = 0
    policy: dict[str, Any] | None = None  # the served policy file: {"policy": ..., "guarantee": ...}
    watch: RiskWatch | None = None  # the served setting's watch (kept after an alarm, to show it)
    alarms: int = 0

    def __post_init__(self) -> None:
        self.max_risk = check_fraction("max_risk", self.max_risk)
        self.alpha = check_fraction("alpha", self.alpha)
        if self.watch_alpha is not None:
            self.watch_alpha = check_fraction("watch_alpha", self.watch_alpha)
        if self.risk not in RISKS:
            raise ParameterError("risk", self.risk, f"must be one of {', '.join(RISKS)}")
        if self.state not in STATES:
            raise ParameterError("state", self.state, f"must be one of {', '.join(STATES)}")
        for name in ("attempt", "next_calibration_at", "traces_since_alarm", "alarms"):
            value = getattr(self, name)
            if not is_integer(value) or value < 0:
                raise ParameterError(name, value, "must be a whole number, at least 0")
        if self.next_calibration_at == 0:
            self.next_calibration_at = first_calibration_at(self.max_risk, self.alpha)
        if (self.state == "serving") != (self.policy is not None):
            raise ParameterError("policy", self.policy, f"must be a policy file object when serving, and null when {self.state}")
        if self.policy is not None and not (isinstance(self.policy, dict) and isinstance(self.policy.get("policy"), dict)):
            raise ParameterError("policy", self.policy, 'must be {"policy": {...}, "guarantee": {...}}')
        if self.state == "serving" and self.watch is None:
            raise ParameterError("watch", None, "must be a watch's state when serving")

    @property
    def stopping(self) -> bool:
        """Whether requests are stopped (a certified setting is served); else they run as in shadow."""
        return self.state == "serving"

    def attempt_alpha(self) -> float:
        """The calibration level the next attempt spends."""
        return attempt_alpha(self.alpha, self.attempt + 1)

    def traced(self, count: int = 1) -> None:
        """``count`` new traces were recorded (shadow traces, audit traces) for this segment."""
        self.traces_since_alarm += count

    def due(self) -> bool:
        """Whether a calibration is due on the traces since the last alarm."""
        return self.traces_since_alarm >= self.next_calibration_at

    def calibrated(self, report: Mapping[str, Any]) -> bool:
        """Take a calibration's report (:func:`codestop.analysis.calibrate.calibrate` at
        :meth:`attempt_alpha`, on the traces since the last alarm); True when it switches to serving a
        setting: the chosen one is certified and saves, and (while serving) saves more than the served one."""
        self.attempt += 1
        self.next_calibration_at = max(2 * self.traces_since_alarm,
                                       calibration_size(self.max_risk, self.attempt_alpha()))
        chosen = report["chosen"]
        saves, _ = saving_of(chosen)
        if not chosen.get("certified") or report["policy"].get("method") == "vanilla" or saves <= 0:
            return False
        if self.policy is not None and saves <= served_saving(self.policy):
            return False
        self.state = "serving"
        self.policy = {"policy": dict(report["policy"]), "guarantee": dict(report["guarantee"])}
        self.watch = RiskWatch(self.max_risk, self.watch_alpha or self.alpha)
        return True

    def audited(self, changed: bool) -> bool:
        """Feed one audit outcome of the served setting; True when the watch alarms on it (-> ``reverted``:
        shadow again, the traces restart). Outcomes arriving when nothing is served (an audit that
        finished after a revert) are ignored."""
        if self.state != "serving" or self.watch is None:
            return False
        if not self.watch.update(changed):
            return False
        self.state = "reverted"
        self.policy = None
        self.alarms += 1
        self.traces_since_alarm = 0
        self.next_calibration_at = calibration_size(self.max_risk, self.attempt_alpha())
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"max_risk": self.max_risk, "alpha": self.alpha, "risk": self.risk, "watch_alpha": self.watch_alpha,
                "state": self.state, "attempt": self.attempt, "next_calibration_at": self.next_calibration_at,
                "traces_since_alarm": self.traces_since_alarm, "policy": self.policy,
                "watch": None if self.watch is None else self.watch.to_dict(), "alarms": self.alarms}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Autopilot:
        if not isinstance(d, Mapping):
            raise ParameterError("autopilot", d, "must be an object")
        for key in ("max_risk", "alpha"):
            if key not in d:
                raise ParameterError(f"autopilot.{key}", None, "is missing")
        watch = d.get("watch")
        try:
            return cls(d["max_risk"], d["alpha"], d.get("risk", "changed"), d.get("watch_alpha"), d.get("state", "watching"),
                       d.get("attempt", 0), d.get("next_calibration_at", 0), d.get("traces_since_alarm", 0),
                       None if d.get("policy") is None else dict(d["policy"]),
                       None if watch is None else RiskWatch.from_dict(watch), d.get("alarms", 0))
        except ParameterError as err:
            raise err.under("autopilot.") from None


def served_saving(policy: Mapping[str, Any]) -> float:
    """The saving a served policy file's guarantee states (0 when it states none)."""
    saving = (policy.get("guarantee") or {}).get("saving", 0.0)
    return float(saving["estimate"] if isinstance(saving, Mapping) else saving)


def recalibrate(autopilot: Autopilot, traces: Sequence[Trace],
                calibrator: Callable[..., dict[str, Any]] = calibrate) -> dict[str, Any]:
    """Run the due calibration on ``traces`` (those since the last alarm) at the attempt's level and feed
    it to ``autopilot``; the report (its ``switched``: whether it now serves a new setting)."""
    report = calibrator(list(traces), risk=autopilot.risk, max_risk=autopilot.max_risk, alpha=autopilot.attempt_alpha())
    report["switched"] = autopilot.calibrated(report)
    return report
