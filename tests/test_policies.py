"""Policies: hand-computed examples, the seed's pseudo-code, and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codestop import CodeStop, Consistency, Decision, Deer, Probe, TokenBudget, Vanilla, make_policy
from codestop.confidence import arithmetic_mean, confidence_function, geometric_mean, minimum, span


def probes(confidences, positions=None, answers=None, texts=None):
    positions = positions or [10 * (i + 1) for i in range(len(confidences))]
    answers = answers or ["1"] * len(confidences)
    texts = texts or [None] * len(confidences)
    return [Probe(position=t, confidence=c, answer=a, text=x) for c, t, a, x in zip(confidences, positions, answers, texts)]


def stops(policy, seq):
    """Index of the first stopping probe (and its reason), or (None, None)."""
    tracker = policy.start()
    for i, p in enumerate(seq):
        d = tracker.update(p)
        if d.stop:
            return i, d.reason
    return None, None


# -- CodeStop, paper variant, by hand ---------------------------------------------------------
# c = 0.5, 0.2, 0.6, 0.3 at T = 10, 20, 40, 80; r = 0.9, 0.925, 0.95, 0.95
# v_1 = [0.4 - 0.5 < 0.55] = 1; v_2 = [1.2 - 0.2 < 0.55] = 0; v_3 = [0.6 - 0.6 < 0.55] = 1
# D_1 = ln(20/20) + 1 = 1; D_2 = ln(40/20) + 1 = 1.693; D_3 = (ln 4 + 1) + (ln 1 + 1) = 3.386
HAND = probes([0.5, 0.2, 0.6, 0.3], [10, 20, 40, 80])


def test_paper_hand_computed_scores():
    tracker = CodeStop(tau=100).start()
    scores = []
    for p in HAND:
        assert not tracker.update(p).stop
        scores.append(tracker.score)
    assert scores == pytest.approx([0.0, 1.0, 1 + math.log(2), 2 + math.log(4)])


def test_paper_hand_computed_stops():
    assert stops(CodeStop(tau=2.0), HAND) == (3, "degenerate")
    assert stops(CodeStop(tau=3.38), HAND) == (3, "degenerate")
    assert stops(CodeStop(tau=3.39), HAND) == (None, None)
    assert stops(CodeStop(tau=1.0), HAND) == (1, "degenerate")  # D_1 = 1 >= 1: non-strict


def test_paper_ramping_threshold():
    policy = CodeStop(r_min=0.9, r_max=0.95, ramp_steps=2)
    assert [policy.threshold(k) for k in range(4)] == pytest.approx([0.9, 0.925, 0.95, 0.95])
    assert stops(policy, probes([0.9])) == (0, "confident")  # c_0 >= r_0, equality stops
    assert stops(policy, probes([0.5, 0.92, 0.94, 0.95])) == (3, "confident")


def test_reference_hand_computed():
    # only falling pairs count: 0.5 -> 0.2 and 0.6 -> 0.3; D = 0 while fewer than 3 probes
    tracker = CodeStop(tau=100, variant="reference").start()
    scores = []
    for p in HAND:
        tracker.update(p)
        scores.append(tracker.score)
    assert scores == pytest.approx([0.0, 0.0, 1 + math.log(2), 2 + math.log(4)])
    assert stops(CodeStop(tau=2.0, variant="reference"), HAND) == (3, "degenerate")
    # a low but rising pair fires in the paper rule, not in the reference code
    rising = probes([0.1, 0.3, 0.35], [10, 20, 30])
    assert CodeStop(tau=1.0).decide(rising[:2]) == Decision(True, "degenerate")
    assert CodeStop(tau=1.0, variant="reference").decide(rising) == Decision(False, None)


def test_reference_is_strict():
    assert stops(CodeStop(variant="reference"), probes([0.9])) == (None, None)
    assert stops(CodeStop(variant="reference"), probes([0.9001])) == (0, "confident")
    # D exactly tau: the paper stops, the reference does not
    seq = probes([0.5, 0.2, 0.1], [10, 20, 20])  # D_2 = 2 falling pairs at T_k = T_i: 1 + 1
    assert CodeStop(tau=2.0).decide(seq) == Decision(True, "degenerate")
    assert CodeStop(tau=2.0, variant="reference").decide(seq) == Decision(False, None)


def test_seed_example_values_stop_at_the_first_probe():
    """The seed's example (r_min = 0, ramp_steps = 5) gives r_0 = 0: any first probe stops."""
    policy = CodeStop(r_min=0.0, ramp_steps=5, tau=7.1)
    assert policy.decide(probes([0.01])) == Decision(True, "confident")


def seed_code_stop_check(confidences, token_positions, step_k, delta=0.55, tau=7.0, r_min=0.0, r_max=0.95, ramp_steps=5):
    """The seed's pseudo-code (seed-codestop.txt), transcribed without torch."""
    r_k = min(r_max, r_min + (r_max - r_min) / ramp_steps * step_k)
    c_k = confidences[-1]
    if c_k >= r_k:
        return True, "high_confidence"
    d_k = 0.0
    t_last = token_positions[-1]
    for i in range(1, len(confidences)):
        v_i = 1 if (2 * confidences[i] - confidences[i - 1] < delta) else 0
        w_i = math.log(t_last / token_positions[i]) + 1
        d_k += w_i * v_i
    if d_k >= tau:
        return True, "degeneration"
    return False, "continue"


confidence_st = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def probe_sequences(draw, min_size=1, max_size=25):
    cs = draw(st.lists(confidence_st, min_size=min_size, max_size=max_size))
    gaps = draw(st.lists(st.integers(min_value=0, max_value=300), min_size=len(cs), max_size=len(cs)))
    positions, t = [], 1
    for g in gaps:
        t += g
        positions.append(t)
    answers = draw(st.lists(st.sampled_from(["1", "2", " 2", ""]), min_size=len(cs), max_size=len(cs)))
    return probes(cs, positions, answers)


@settings(max_examples=300, deadline=None)
@given(probe_sequences(), st.floats(0.5, 12), st.floats(0.0, 0.95), st.integers(1, 6))
def test_paper_variant_matches_the_seed_pseudo_code(seq, tau, r_min, ramp):
    policy = CodeStop(tau=tau, r_min=r_min, ramp_steps=ramp)
    tracker = policy.start()
    for k, p in enumerate(seq):
        ours = tracker.update(p)
        stop, reason = seed_code_stop_check(
            [q.confidence for q in seq[: k + 1]], [q.position for q in seq[: k + 1]], k, tau=tau, r_min=r_min, ramp_steps=ramp
        )
        if stop and ours.stop:
            assert {"high_confidence": "confident", "degeneration": "degenerate"}[reason] == ours.reason
        else:
            # the O(1) score may differ from the direct sum by rounding only at the boundary
            if stop != ours.stop:
                direct = _direct_score(seq[: k + 1], "paper", 0.55)
                assert abs(direct - tau) < 1e-9
        if ours.stop:
            break


def _direct_score(seq, variant, delta):
    t_k = seq[-1].position
    score = 0.0
    for i in range(1, len(seq)):
        c, prev = seq[i].confidence, seq[i - 1].confidence
        if variant == "paper":
            v = 2 * c - prev < delta
        else:
            v = prev > c
        score += v * (math.log(t_k / seq[i].position) + 1)
    if variant == "reference" and len(seq) < 3:
        return 0.0
    return score


@settings(max_examples=300, deadline=None)
@given(probe_sequences(), st.sampled_from(["paper", "reference"]))
def test_o1_score_equals_direct_sum(seq, variant):
    tracker = CodeStop(tau=1e9, variant=variant, r_min=1.0, r_max=1.0).start()
    for k, p in enumerate(seq):
        tracker.update(p)
        assert tracker.score == pytest.approx(_direct_score(seq[: k + 1], variant, 0.55), rel=1e-9, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(probe_sequences(), st.floats(0, 20), st.floats(0, 20), st.sampled_from(["paper", "reference"]))
def test_larger_tau_never_stops_earlier(seq, a, b, variant):
    lo, hi = sorted((a, b))
    i_lo, _ = stops(CodeStop(tau=lo, variant=variant), seq)
    i_hi, _ = stops(CodeStop(tau=hi, variant=variant), seq)
    if i_hi is not None:
        assert i_lo is not None and i_lo <= i_hi


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 50), st.integers(0, 500))
def test_threshold_never_exceeds_r_max(r1, r2, ramp, k):
    r_min, r_max = sorted((r1, r2))
    assert CodeStop(r_min=r_min, r_max=r_max, ramp_steps=ramp).threshold(k) <= r_max


ALL_POLICIES = [
    CodeStop(),
    CodeStop(tau=2.0, variant="reference"),
    CodeStop(tau=3.0, r_min=0.5, ramp_steps=4),
    Deer(),
    Deer(threshold=0.6),
    Consistency(window=2),
    TokenBudget(budget=200),
    Vanilla(),
]


@settings(max_examples=200, deadline=None)
@given(probe_sequences())
def test_decide_and_tracker_agree_on_every_prefix(seq):
    for policy in ALL_POLICIES:
        tracker = policy.start()
        for k, p in enumerate(seq):
            assert tracker.update(p) == policy.decide(seq[: k + 1])


def test_one_policy_serves_concurrent_sessions():
    policy = CodeStop(tau=2.0)
    a, b = policy.start(), policy.start()
    for p in HAND[:3]:
        a.update(p)
    assert b.update(HAND[0]) == Decision(False, None)
    assert a.update(HAND[3]) == Decision(True, "degenerate")


# -- peers -------------------------------------------------------------------------------------


def test_deer_exits_strictly_above_threshold():
    assert stops(Deer(threshold=0.95), probes([0.5, 0.95, 0.96])) == (2, "threshold")


def test_consistency_needs_agreement_without_hedging():
    seq = probes([0.1] * 6, answers=["3", "4", "4", "4", "4", "4"], texts=["3}", "4}", "4} wait", "4}", "4}", "4}"])
    assert stops(Consistency(window=3), seq) == (5, "consistent")  # the hedged probe blocks until it leaves
    assert stops(Consistency(window=2), probes([0.1] * 2, answers=["", ""])) == (None, None)
    assert stops(Consistency(window=2), probes([0.1] * 2, answers=["1 2", "12"])) == (1, "consistent")


def test_budget_and_vanilla():
    assert TokenBudget(budget=30).max_reasoning_tokens == 30
    assert not TokenBudget().needs_probes and not Vanilla().needs_probes
    assert stops(TokenBudget(budget=30), probes([0.1, 0.1, 0.1])) == (2, "budget")
    assert stops(Vanilla(), probes([1.0] * 5)) == (None, None)


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: CodeStop(tau=-1), "tau"),
        (lambda: CodeStop(r_max=1.5), "r_max"),
        (lambda: CodeStop(ramp_steps=0), "ramp_steps"),
        (lambda: CodeStop(r_min=0.99, r_max=0.95), "r_min"),
        (lambda: CodeStop(variant="fast"), "variant"),
        (lambda: CodeStop(confidence="median"), "confidence"),
        (lambda: Deer(threshold=2), "threshold"),
        (lambda: Consistency(window=0), "window"),
        (lambda: TokenBudget(budget=0), "budget"),
        (lambda: Probe(position=10, confidence=1.5), "confidence"),
        (lambda: Probe(position=0, confidence=0.5), "position"),
        (lambda: make_policy("fastest"), "method"),
        (lambda: make_policy("deer", tau=3), "tau"),
    ],
)
def test_invalid_parameters_name_the_parameter(make, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        make()


def test_positions_going_backwards_raise():
    tracker = CodeStop().start()
    tracker.update(Probe(position=50, confidence=0.1))
    with pytest.raises(ValueError, match=r"^position: 40 goes backwards"):
        tracker.update(Probe(position=40, confidence=0.1))


def test_policies_are_immutable():
    policy = CodeStop()
    with pytest.raises(AttributeError):
        policy.tau = 3  # type: ignore[misc]


def test_make_policy_leaves_none_at_defaults():
    assert make_policy("codestop", tau=3.0, delta=None) == CodeStop(tau=3.0)
    assert make_policy("deer", threshold=0.9).threshold == 0.9


def test_policies_import_no_torch():
    import subprocess
    import sys

    code = "import sys, codestop; from codestop import CodeStop, Probe; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- confidence functions -------------------------------------------------------------------------


def test_confidence_functions_by_hand():
    lps = [math.log(0.5), math.log(0.8)]
    assert arithmetic_mean(lps) == pytest.approx(0.65)
    assert geometric_mean(lps) == pytest.approx(math.sqrt(0.4))
    assert minimum(lps) == pytest.approx(0.5)
    # the reference divides the answer tokens' log-sum by m + 1 (n - 1 over "{ a1 a2 }")
    assert span(lps) == pytest.approx(math.exp(math.log(0.4) / 3))
    assert confidence_function("span") is span
    assert arithmetic_mean([]) == 0.0
    with pytest.raises(ValueError, match="logprobs"):
        geometric_mean([0.3])


def test_default_confidence_per_policy():
    assert CodeStop().confidence == "geometric"
    assert CodeStop(variant="reference").confidence == "span"
    assert Deer().confidence == "mean"
