"""Sweep and calibrate on synthetic traces whose right answers are known by construction."""

from __future__ import annotations

import json
import math

import pytest

from codestop.analysis.calibrate import calibrate_by_drop, compare_to_vanilla
from codestop.analysis.statistics import clopper_pearson_upper, drop_bounds, paired_bootstrap
from codestop.analysis.sweep import Point, mark_pareto, parse_range, run_policy, sweep
from codestop.cli import main
from codestop.errors import CodestopError
from codestop.figures.tradeoff import knob_labels, tradeoff_figure
from codestop.policies import make_policy
from codestop.traces import trace_from_json


def test_parse_range():
    values = parse_range("2:12:0.5")
    assert len(values) == 21 and values[0] == 2 and values[-1] == 12 and values[1] == 2.5
    assert parse_range("0.1:0.3:0.1") == [0.1, 0.2, 0.3]  # no float drift drops the stop
    assert parse_range("0.9,0.95,0.9") == [0.9, 0.95]
    assert parse_range("2:6:2", int) == [2, 4, 6]
    assert parse_range("7") == [7.0]
    for bad in ("2:1:0.5", "1:2:0", "a:b:c", "1:2", "1.5:3:1"):
        with pytest.raises(CodestopError):
            parse_range(bad, int if bad == "1.5:3:1" else float)


def test_pareto_marks_only_undominated_points():
    pts = [
        Point("vanilla", "", None, 10, 0.80, 100, 100, 0, 0),
        Point("a", "k", 1, 10, 0.80, 60, 60, 0, 0.4),  # dominates vanilla
        Point("a", "k", 2, 10, 0.70, 60, 60, -0.1, 0.4),  # dominated by the one above
        Point("b", "k", 1, 10, 0.60, 30, 30, -0.2, 0.7),
        Point("b", "k", 2, 10, 0.60, 40, 40, -0.2, 0.6),  # dominated: same accuracy, more tokens
    ]
    mark_pareto(pts)
    assert [p.pareto for p in pts] == [False, True, False, True, False]


def _ladder(i: int, right_from: int) -> dict:
    """Probes every 100 tokens up to 1000; the answer is right from position ``right_from`` on."""
    probes = [{"position": pos, "confidence": 0.5, "answer": "x", "correct": pos >= right_from, "probe_tokens": 4}
              for pos in range(100, 1001, 100)]
    return {"id": f"t{i}", "probes": probes, "final_correct": True, "reasoning_tokens": 1000}


def _traces(right_from):
    return [trace_from_json(_ladder(i, r), f"syn:{i + 1}") for i, r in enumerate(right_from)]


def test_sweep_on_a_budget_ladder():
    traces = _traces([300, 500, 200, 400])
    pts = sweep(traces, {"budget": [100, 300, 500, 700]})
    by = {(p.method, p.value): p for p in pts}
    assert by[("vanilla", None)].accuracy == 1.0 and by[("vanilla", None)].mean_reasoning_tokens == 1000
    assert by[("budget", 100)].accuracy == 0.0
    assert by[("budget", 300)].accuracy == 0.5 and by[("budget", 300)].mean_reasoning_tokens == 300
    assert by[("budget", 500)].accuracy == 1.0 and by[("budget", 500)].saving == pytest.approx(0.5)
    assert by[("budget", 500)].pareto and not by[("budget", 700)].pareto and not by[("vanilla", None)].pareto


def test_sweep_codestop_tau_is_monotone():
    # confidence rises to 1.0 late; falling pairs along the way make D grow: lower tau stops sooner
    conf = [0.6, 0.3, 0.55, 0.2, 0.5, 0.1, 0.4, 0.2, 0.3, 1.0]
    t = {"id": "a", "probes": [{"position": 100 * (i + 1), "confidence": c, "answer": "1", "correct": i >= 8, "probe_tokens": 3}
                               for i, c in enumerate(conf)]}
    pts = [p for p in sweep([trace_from_json(t, "x:1")], {"codestop": [0.5, 1, 2, 4, 8, 50]}) if p.method == "codestop"]
    tokens = [p.mean_reasoning_tokens for p in pts]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1] == 1000


def test_calibrate_finds_the_known_budget():
    # every question is right from 500 tokens on (half of them from 300): budget 500 is the cheapest
    # value with no loss, 300 loses half of the questions
    traces = _traces([500, 300] * 30)
    result = calibrate_by_drop(traces, 0.0, method="budget", values=[100, 300, 500, 700, 900], calibration_fraction=0.5, seed=1)
    assert result["chosen"] == 500
    assert result["n_calibration"] == 30 and result["n_held_out"] == 30
    held = result["held_out"]
    assert held["accuracy_drop"] == 0.0 and held["lost"] == 0
    assert held["saving"] == pytest.approx(0.5)
    assert held["drop_upper_95_exact"] == pytest.approx(1 - 0.05 ** (1 / 30), rel=1e-6)
    assert "does NOT certify" in result["statement"]  # 30 held-out questions cannot certify a 0-point drop
    # allowing a 60-point drop picks 300 (loses the 500s: half)
    assert calibrate_by_drop(traces, 0.6, method="budget", values=[100, 300, 500], seed=1)["chosen"] == 300


def test_calibrate_says_when_nothing_qualifies():
    traces = _traces([900] * 10)
    result = calibrate_by_drop(traces, 0.01, method="budget", values=[100, 200])
    assert result["chosen"] is None and "vanilla" in result["statement"]
    with pytest.raises(CodestopError, match="fraction"):
        calibrate_by_drop(traces, 1.5, method="budget")


def test_bounds():
    from scipy.stats import beta, norm

    assert clopper_pearson_upper(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    # the exact bound is the beta quantile (Clopper-Pearson), at any confidence
    for k, n, conf in [(0, 10, 0.95), (3, 40, 0.95), (50, 100, 0.9), (7, 1000, 0.99), (999, 1000, 0.95)]:
        assert clopper_pearson_upper(k, n, conf) == pytest.approx(beta.ppf(conf, k + 1, n - k), rel=1e-9)
    assert clopper_pearson_upper(5, 5) == 1.0 and clopper_pearson_upper(0, 0) == 1.0
    b = drop_bounds(lost=6, gained=2, n=200)
    assert b["drop"] == pytest.approx(0.02) and b["exact"] > 6 / 200 and b["normal"] > 0.02
    # the normal bound's z is the normal quantile of the asked confidence (the old table knew 3 values)
    sd = math.sqrt((8 / 200 - 0.02**2) / 200)
    assert drop_bounds(6, 2, 200, confidence=0.8)["normal"] == pytest.approx(0.02 + norm.ppf(0.8) * sd, rel=1e-9)


def test_paired_bootstrap_resamples_pairs_with_a_fixed_seed():
    import numpy as np
    from scipy.stats import bootstrap

    rng = np.random.default_rng(5)
    theirs = rng.normal(300, 80, size=60)  # question difficulty varies a lot ...
    ours = theirs - 40 + rng.normal(0, 5, size=60)  # ... the saving per question hardly
    a = paired_bootstrap(ours, theirs)
    assert a == paired_bootstrap(ours, theirs)  # fixed seed: the same interval every time
    assert a["low"] < a["estimate"] < a["high"] and a["method"] == "BCa"
    assert a["high"] - a["low"] < 6  # pairing removes the difficulty spread: unpaired it is ~60 tokens wide
    ref = bootstrap((ours, theirs), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True, vectorized=True,
                    n_resamples=9999, rng=np.random.default_rng(0))
    assert (a["low"], a["high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    same = paired_bootstrap([1, 0, 1], [1, 0, 1])
    assert (same["estimate"], same["low"], same["high"], same["method"]) == (0.0, 0.0, 0.0, "degenerate")
    with pytest.raises(ValueError, match="pair"):
        paired_bootstrap([1, 2], [1])


def test_calibrate_reports_the_split_it_used_and_bootstrap_intervals():
    # 31 traces: round(15.5) = 16 calibration, 15 held out; the report must say 16 and 15, from the lists
    traces = _traces([500, 300] * 15 + [300])
    result = calibrate_by_drop(traces, 0.0, method="budget", values=[100, 300, 500, 700], seed=3)
    assert result["n_calibration"] == len(result["calibration_ids"]) == 16
    assert result["n_held_out"] == len(result["held_out_ids"]) == result["held_out"]["n"] == 15
    assert sorted(result["calibration_ids"] + result["held_out_ids"]) == sorted(t.id for t in traces)
    assert result["statement"].startswith("Split: 16 calibration and 15 held-out traces of 31 (seed 3).")
    boot = result["held_out"]["paired_bootstrap"]
    held = [t for t in traces if t.id in set(result["held_out_ids"])]
    rows = run_policy(held, make_policy("budget", budget=500))
    vanilla = run_policy(held, make_policy("vanilla"))
    assert boot == compare_to_vanilla(rows, vanilla, seed=3)
    assert boot["cost_change"]["estimate"] == pytest.approx(-500)  # budget 500 against 1000-token traces
    assert "Paired bootstrap" in result["statement"] and "mean cost -500.0 tokens" in result["statement"]
    none = calibrate_by_drop(traces, 0.0, method="budget", values=[100])  # nothing qualifies: the sizes are still said
    assert none["chosen"] is None and none["statement"].startswith("Split: 16 calibration and 15 held-out traces of 31")


def test_calibrate_on_given_ids_uses_exactly_that_split():
    # a second recording of the same questions is calibrated on the first one's calibration half
    traces = _traces([500, 300] * 10)
    first = calibrate_by_drop(traces, 0.0, method="budget", values=[100, 300, 500, 700], seed=3)
    again = calibrate_by_drop(list(reversed(traces)), 0.0, method="budget", values=[100, 300, 500, 700],
                      calibration_ids=first["calibration_ids"])
    assert sorted(again["calibration_ids"]) == sorted(first["calibration_ids"])
    assert sorted(again["held_out_ids"]) == sorted(first["held_out_ids"])
    assert "(the given calibration ids)" in again["statement"]
    with pytest.raises(CodestopError, match="calibration_ids"):
        calibrate_by_drop(traces, 0.0, method="budget", values=[100], calibration_ids=["nowhere:1"])


def test_cli_sweep_writes_table_and_plot(tmp_path, capsys):
    path = tmp_path / "syn.jsonl"
    path.write_text("".join(json.dumps(_ladder(i, r)) + "\n" for i, r in enumerate([300, 500, 200, 400])))
    assert main(["sweep", str(path), "--method", "budget", "--budget", "100:900:200", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "s.md").read_text()
    assert "| budget | budget=500 | 100.0% | 500 |" in table
    assert "budget,budget,500" in (tmp_path / "s.csv").read_text()
    capsys.readouterr()
    assert main(["calibrate", str(path), "--method", "budget", "--budget", "100:900:200", "--max-accuracy-drop", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["knob"] == "budget"
    assert main(["sweep", str(path), "--tau", "3:1:1"]) == 2


def test_tradeoff_figure_labels_every_value_and_explains_itself():
    import matplotlib.pyplot as plt

    traces = _traces([300, 500, 200, 400])
    pts = sweep(traces, {"budget": [100, 200, 300, 350, 500, 700, 900]})
    budget = [p for p in pts if p.method == "budget"]
    # every budget lands on a point of its own here: one label each
    labels = {text: members for members, text in knob_labels(budget)}
    assert set(labels) == {"100", "200", "300", "350", "500", "700", "900"}
    twins = [Point("x", "k", v, 1, 0.5, 10, 10, 0, 0) for v in (0.25, 0.5, 0.75)] + [Point("x", "k", 1.0, 1, 0.6, 12, 12, 0, 0)]
    assert sorted(text for _, text in knob_labels(twins)) == ["0.25-0.75", "1"]
    fig = tradeoff_figure(pts, "t")
    ax = fig.axes[0]
    shown = {t.get_text() for t in ax.texts}
    assert {"100", "200", "300", "350", "500", "700", "900"} <= shown  # every knob value is written by its point
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("vanilla: 100.0%, 1000 tokens") for t in legend)
    assert any("faded" in t and "frontier" in t for t in legend)
    vanilla_lines = [line for line in ax.get_lines() if list(line.get_ydata()) == [100.0, 100.0]]
    assert vanilla_lines  # vanilla's accuracy as a reference line across the plot
    plt.close(fig)


def test_tradeoff_figure_gives_each_unnamed_series_its_own_colour():
    import matplotlib.pyplot as plt

    pts = [Point("vanilla", "", None, 1, 0.5, 100, 100, 0, 0)]
    for series in ("codestop r_max=0.99", "codestop r_max=0.999", "deer"):
        pts += [Point(series, "k", v, 1, 0.2 + v / 10, 20 * v, 20 * v, 0, 0) for v in (1, 2)]
    fig = tradeoff_figure(pts)
    lines = {line.get_label().split(" (")[0]: line.get_color() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"codestop r_max=0.99", "codestop r_max=0.999", "deer"}
    assert len(set(lines.values())) == 3
    plt.close(fig)
