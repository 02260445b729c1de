"""Sweep and calibrate on synthetic traces whose right answers are known by construction."""

from __future__ import annotations

import json
import math

import pytest

from codestop.cli import main
from codestop.errors import CodestopError
from codestop.sweep import (
    Point,
    calibrate,
    clopper_pearson_upper,
    drop_bounds,
    mark_pareto,
    parse_range,
    sweep,
)
from codestop.replay import trace_from_json


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
    assert by[("vanilla", None)].accuracy == 1.0 and by[("vanilla", None)].mean_tokens == 1000
    assert by[("budget", 100)].accuracy == 0.0
    assert by[("budget", 300)].accuracy == 0.5 and by[("budget", 300)].mean_tokens == 300
    assert by[("budget", 500)].accuracy == 1.0 and by[("budget", 500)].token_saving == pytest.approx(0.5)
    assert by[("budget", 500)].pareto and not by[("budget", 700)].pareto and not by[("vanilla", None)].pareto


def test_sweep_codestop_tau_is_monotone():
    # confidence rises to 1.0 late; falling pairs along the way make D grow: lower tau stops sooner
    conf = [0.6, 0.3, 0.55, 0.2, 0.5, 0.1, 0.4, 0.2, 0.3, 1.0]
    t = {"id": "a", "probes": [{"position": 100 * (i + 1), "confidence": c, "answer": "1", "correct": i >= 8, "probe_tokens": 3}
                               for i, c in enumerate(conf)]}
    pts = [p for p in sweep([trace_from_json(t, "x:1")], {"codestop": [0.5, 1, 2, 4, 8, 50]}) if p.method == "codestop"]
    tokens = [p.mean_tokens for p in pts]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1] == 1000


def test_calibrate_finds_the_known_budget():
    # every question is right from 500 tokens on (half of them from 300): budget 500 is the cheapest
    # value with no loss, 300 loses half of the questions
    traces = _traces([500, 300] * 30)
    result = calibrate(traces, 0.0, method="budget", values=[100, 300, 500, 700, 900], calibration_fraction=0.5, seed=1)
    assert result["chosen"] == 500
    assert result["n_calibration"] == 30 and result["n_held_out"] == 30
    held = result["held_out"]
    assert held["accuracy_drop"] == 0.0 and held["lost"] == 0
    assert held["token_saving"] == pytest.approx(0.5)
    assert held["drop_upper_95_exact"] == pytest.approx(1 - 0.05 ** (1 / 30), rel=1e-6)
    assert "does NOT certify" in result["statement"]  # 30 held-out questions cannot certify a 0-point drop
    # allowing a 60-point drop picks 300 (loses the 500s: half)
    assert calibrate(traces, 0.6, method="budget", values=[100, 300, 500], seed=1)["chosen"] == 300


def test_calibrate_says_when_nothing_qualifies():
    traces = _traces([900] * 10)
    result = calibrate(traces, 0.01, method="budget", values=[100, 200])
    assert result["chosen"] is None and "vanilla" in result["statement"]
    with pytest.raises(CodestopError, match="fraction"):
        calibrate(traces, 1.5, method="budget")


def test_bounds():
    assert clopper_pearson_upper(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    # k = n/2: the bound sits above the estimate, within a normal-approximation margin
    ub = clopper_pearson_upper(50, 100)
    assert 0.55 < ub < 0.5 + 1.645 * math.sqrt(0.25 / 100) + 0.01
    b = drop_bounds(lost=6, gained=2, n=200)
    assert b["drop"] == pytest.approx(0.02) and b["exact"] > 6 / 200 and b["normal"] > 0.02


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
