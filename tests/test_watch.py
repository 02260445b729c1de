"""The watch (codestop.watch.RiskWatch): its false-alarm rate at the null's boundary, its detection of a
risk well above the stated one, its confidence sequence, its state's exact round trip, its parameter
errors, and a cross-check against an independent implementation (the ``ville`` package) where installed."""

from __future__ import annotations

import json
import math
import random

import pytest

from codestop.errors import ParameterError
from codestop.watch import RiskWatch, confidence_interval


def run(watch: RiskWatch, p: float, audits: int, rng: random.Random) -> int | None:
    for _ in range(audits):
        watch.update(rng.random() < p)
        if watch.alarm:
            return watch.alarmed_at
    return None


def test_false_alarm_rate_at_the_null_boundary_is_at_most_alpha():
    # the risk exactly at max_risk, the hardest null: the alarm rate over a long stream, many seeds,
    # stays within alpha plus three standard errors of the simulation
    alpha, seeds, audits = 0.2, 600, 1000
    alarms = sum(run(RiskWatch(0.1, alpha), 0.1, audits, random.Random(seed)) is not None for seed in range(seeds))
    rate = alarms / seeds
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / seeds), rate


def test_false_alarm_rate_when_the_risk_drifts_below_max_risk():
    # any order, any drift within the null: a stream whose changed chance wanders in [0, max_risk]
    alpha, seeds = 0.2, 400
    alarms = 0
    for seed in range(seeds):
        rng, watch = random.Random(seed), RiskWatch(0.2, alpha)
        for t in range(800):
            watch.update(rng.random() < (0.2 if (t // 50) % 2 else 0.02))
        alarms += watch.alarm
    assert alarms / seeds <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / seeds)


def test_a_risk_well_above_max_risk_alarms_within_a_bounded_number_of_audits():
    delays = [run(RiskWatch(0.1, 0.05), 0.3, 300, random.Random(seed)) for seed in range(200)]
    assert all(d is not None and d <= 300 for d in delays), delays
    assert sorted(d for d in delays if d is not None)[100] <= 100  # the median


def test_a_shift_after_a_long_stretch_below_max_risk_is_detected_promptly():
    # 400 audits at 11% under a 15% level, then 25%: the bet follows the recent share, not the long average
    delays = []
    for seed in range(100):
        rng, watch = random.Random(seed), RiskWatch(0.15, 0.05)
        for _ in range(400):
            watch.update(rng.random() < 0.11)
        before = watch.alarm
        delays.append(None if before else run(watch, 0.25, 1600, rng))
    detected = sorted(d - 400 for d in delays if d is not None)
    assert len(detected) >= 98 and detected[len(detected) // 2] <= 300, detected


def test_no_change_at_all_never_alarms_and_the_wealth_stays_positive():
    watch = RiskWatch(0.05, 0.05)
    for _ in range(5000):
        assert not watch.update(False)
    assert watch.e_value > 0 and not watch.alarm and watch.n == 5000


def test_update_reports_the_first_crossing_only_and_the_alarm_is_sticky():
    watch = RiskWatch(0.1, 0.05)
    raised = [watch.update(True) for _ in range(20)]
    assert raised.count(True) == 1 and watch.alarmed_at == raised.index(True) + 1
    assert watch.e_value >= 20
    assert not any(watch.update(x) for x in [True] * 50 + [False] * 500)  # never raised twice
    assert watch.alarm and watch.alarmed_at == raised.index(True) + 1


def test_round_trip_mid_stream_resumes_identically():
    rng = random.Random(7)
    outcomes = [rng.random() < 0.15 for _ in range(400)]
    whole = RiskWatch(0.1, 0.05)
    for x in outcomes:
        whole.update(x)
    half = RiskWatch(0.1, 0.05)
    for x in outcomes[:200]:
        half.update(x)
    resumed = RiskWatch.from_dict(json.loads(json.dumps(half.to_dict())))
    assert resumed == half
    for x in outcomes[200:]:
        resumed.update(x)
    assert resumed == whole and resumed.to_dict() == whole.to_dict()


@pytest.mark.parametrize("max_risk, alpha", [(0, 0.05), (1, 0.05), (0.1, 1.5), (0.1, 0), (float("nan"), 0.05),
                                             (0.1, float("nan")), (True, 0.05), ("0.1", 0.05), (0.1, float("inf"))])
def test_nonsense_parameters_give_one_clear_error(max_risk, alpha):
    with pytest.raises(ParameterError) as err:
        RiskWatch(max_risk, alpha)
    assert "strictly between 0 and 1" in str(err.value)


@pytest.mark.parametrize("state", [{"alpha": 0.05}, {"max_risk": 0.1, "alpha": 0.05, "n": 3, "changed": 4},
                                   {"max_risk": 0.1, "alpha": 0.05, "n": -1},
                                   {"max_risk": 0.1, "alpha": 0.05, "log_wealth": float("nan")},
                                   {"max_risk": 0.1, "alpha": 0.05, "n": 2, "alarmed_at": 3}])
def test_a_damaged_state_gives_a_parameter_error_naming_the_field(state):
    with pytest.raises(ParameterError) as err:
        RiskWatch.from_dict(state)
    assert str(err.value).startswith("watch.")


def test_the_confidence_sequence_covers_a_constant_share_at_every_audit():
    alpha, seeds, p = 0.1, 300, 0.2
    missed = 0
    for seed in range(seeds):
        rng, changed = random.Random(seed), 0
        for n in range(1, 301):
            changed += rng.random() < p
            low, high = confidence_interval(changed, n, alpha)
            if not low <= p <= high:
                missed += 1
                break
    assert missed / seeds <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / seeds)


def test_the_interval_narrows_around_the_share_and_starts_as_everything():
    watch = RiskWatch(0.1, 0.05)
    assert watch.interval() == (0.0, 1.0) and watch.changed_share is None
    for i in range(1000):
        watch.update(i % 10 == 0)
    low, high = watch.interval()
    assert 0.06 < low < 0.1 < high < 0.14
    assert confidence_interval(0, 50, 0.05)[0] == 0.0 and confidence_interval(50, 50, 0.05)[1] == 1.0


def test_agrees_with_ville():
    # an independent implementation: ville's beta-binomial mixture CS (the same construction) gives the
    # same interval; ville's one-sided betting test is an e-process for the same null, so both stay below
    # 1/alpha on an unchanged stream and both alarm on a bad one
    np = pytest.importorskip("numpy")
    ville = pytest.importorskip("ville")
    rng = random.Random(3)
    x = [rng.random() < 0.3 for _ in range(400)]
    cs = ville.BernoulliCS(alpha=0.05, prior=(0.5, 0.5), intersect=False)
    cs.update(np.array(x, dtype=float))
    changed = 0
    for n, xi in enumerate(x, 1):
        changed += xi
        low, high = confidence_interval(changed, n, 0.05)
        assert low == pytest.approx(cs.lower_[n - 1], abs=1e-6) and high == pytest.approx(cs.upper_[n - 1], abs=1e-6)
    test = ville.BettingTest(0.1, alternative="greater", alpha=0.05)
    test.update(np.array(x, dtype=float))
    watch = RiskWatch(0.1, 0.05)
    for xi in x:
        watch.update(xi)
    ville_alarm = test.stopping_time()
    assert ville_alarm is not None and watch.alarm
    quiet = ville.BettingTest(0.1, alternative="greater", alpha=0.05)
    quiet.update(np.zeros(400))
    still = RiskWatch(0.1, 0.05)
    for _ in range(400):
        still.update(False)
    assert quiet.stopping_time() is None and not still.alarm
