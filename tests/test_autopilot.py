"""Auto mode's state machine (codestop.autopilot): the schedule, the error spending, the states
watching -> serving -> reverted -> serving, the exact round trip of its state, and a real calibration
on the testbed traces through ``recalibrate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from codestop.analysis.risk import min_certifiable_n, split
from codestop.autopilot import Autopilot, attempt_alpha, calibration_size, first_calibration_at, recalibrate
from codestop.errors import ParameterError
from codestop.traces import load_traces

TESTBED = Path(__file__).resolve().parents[1] / "bench" / "results" / "testbed-gsm8k-heldout-solve-then-check.traces.jsonl"


def report(saving: float, certified: bool = True, method: str = "codestop") -> dict:
    policy = {"method": method} if method == "vanilla" else {"method": method, "tau": 5.0}
    return {"policy": policy, "chosen": {"certified": certified, "saving": saving},
            "guarantee": {"risk": "changed", "max_risk": 0.1, "alpha": 0.03, "saving": saving, "policy": policy}}


def test_the_attempt_levels_sum_to_alpha():
    assert sum(attempt_alpha(0.05, k) for k in range(1, 200_000)) == pytest.approx(0.05, rel=1e-4)
    assert sum(attempt_alpha(0.05, k) for k in range(1, 200_000)) < 0.05


@pytest.mark.parametrize("max_risk, alpha", [(0.1, 0.05), (0.05, 0.01), (0.02, 0.1)])
def test_the_first_calibration_is_the_least_number_that_could_certify(max_risk, alpha):
    n = first_calibration_at(max_risk, alpha)
    need = min_certifiable_n(max_risk, attempt_alpha(alpha, 1))
    assert len(split(n, 0.3, 0)[1]) >= need > len(split(n - 1, 0.3, 0)[1])
    assert Autopilot(max_risk, alpha).next_calibration_at == n


def test_watching_to_serving_to_reverted_and_back():
    ap = Autopilot(0.1, 0.05)
    first = ap.next_calibration_at
    ap.traced(first - 1)
    assert not ap.due()
    ap.traced()
    assert ap.due() and ap.attempt_alpha() == attempt_alpha(0.05, 1)
    assert not ap.calibrated(report(0.0, certified=False, method="vanilla"))  # nothing certified: keep watching
    assert ap.state == "watching" and ap.attempt == 1 and not ap.due()
    assert ap.next_calibration_at == max(2 * first, calibration_size(0.1, attempt_alpha(0.05, 2)))
    assert not ap.calibrated(report(0.0, certified=True, method="vanilla"))  # vanilla never serves
    ap.traced(ap.next_calibration_at)
    assert ap.calibrated(report(0.2)) and ap.state == "serving" and ap.stopping
    assert ap.policy == {"policy": {"method": "codestop", "tau": 5.0}, "guarantee": report(0.2)["guarantee"]}
    assert ap.watch is not None and ap.watch.max_risk == 0.1 and ap.watch.alpha == 0.05
    assert not ap.calibrated(report(0.1))  # saves less than the served one: keep it
    served_watch = ap.watch
    assert ap.calibrated(report(0.3)) and ap.watch is not served_watch  # saves more: a new setting, a fresh watch
    for _ in range(10):
        assert not ap.audited(False)
    raised = [ap.audited(True) for _ in range(30)]
    assert raised.count(True) == 1 and ap.state == "reverted" and not ap.stopping and ap.policy is None
    assert ap.alarms == 1 and ap.traces_since_alarm == 0 and ap.watch is not None and ap.watch.alarm
    assert not ap.audited(True)  # a late audit after the revert changes nothing
    assert ap.next_calibration_at == calibration_size(0.1, ap.attempt_alpha())
    attempts = ap.attempt
    ap.traced(ap.next_calibration_at)
    assert ap.due() and ap.attempt_alpha() == attempt_alpha(0.05, attempts + 1)  # the spending never restarts
    assert ap.calibrated(report(0.05)) and ap.state == "serving" and not ap.watch.alarm


def test_round_trip_is_exact_in_every_state():
    ap = Autopilot(0.1, 0.05, watch_alpha=0.01)
    states = [Autopilot.from_dict(json.loads(json.dumps(ap.to_dict())))]
    ap.traced(ap.next_calibration_at)
    ap.calibrated(report(0.2))
    for i in range(7):
        ap.audited(i % 3 == 0)
    states.append(Autopilot.from_dict(json.loads(json.dumps(ap.to_dict()))))
    assert states[-1] == ap and states[-1].to_dict() == ap.to_dict()
    while not ap.audited(True):
        pass
    again = Autopilot.from_dict(json.loads(json.dumps(ap.to_dict())))
    assert again == ap and again.state == "reverted"


@pytest.mark.parametrize("bad", [{"max_risk": 0, "alpha": 0.05}, {"max_risk": 0.1, "alpha": 1.5},
                                 {"max_risk": 0.1, "alpha": math.nan}, {"max_risk": 0.1, "alpha": 0.05, "state": "asleep"},
                                 {"max_risk": 0.1, "alpha": 0.05, "state": "serving"},
                                 {"max_risk": 0.1, "alpha": 0.05, "risk": "wrong"},
                                 {"max_risk": 0.1, "alpha": 0.05, "watch": {"max_risk": 0.1, "alpha": 2}}])
def test_a_damaged_state_gives_one_parameter_error(bad):
    with pytest.raises(ParameterError) as err:
        Autopilot.from_dict(bad)
    assert str(err.value).startswith("autopilot.")


def test_recalibrate_on_the_testbed_serves_a_certified_saving_setting():
    traces = load_traces(TESTBED)
    ap = Autopilot(0.1, 0.05)
    ap.traced(len(traces))
    out = recalibrate(ap, traces)
    assert out["alpha"] == attempt_alpha(0.05, 1) and out["switched"] == ap.stopping
    assert ap.stopping and out["chosen"]["certified"] and out["chosen"]["saving"] > 0
    assert ap.policy is not None and ap.policy["policy"] == out["policy"]
