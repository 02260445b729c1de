"""Risk-controlled calibration (Learn-then-Test): its error rate on a synthetic population with known
risks, certification and refusal on traces whose outcomes are known by construction, the two risks,
the command line and the policy file it writes."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from codestop.analysis.calibrate import calibrate, format_report
from codestop.analysis.risk import candidate_grid, learn_then_test, min_certifiable_n, outcomes, split
from codestop.cli import main
from codestop.errors import CodestopError
from codestop.grading import same_answer
from codestop.policies import make_policy
from codestop.policy_file import PolicyFile, read_policy_file, write_policy_file
from codestop.traces import trace_from_json

TESTBED = Path(__file__).resolve().parents[1] / "bench" / "results" / "testbed-gsm8k-heldout-solve-then-check.traces.jsonl"


def test_same_answer_compares_as_the_grader_does():
    assert same_answer("18", "18.0", "integer") and same_answer("$1,250", "1250", "integer")
    assert not same_answer("18", "19", "integer") and not same_answer("16-2", "14", "integer")
    assert same_answer("(C)", "C", "choice") and not same_answer("B", "C", "choice")
    assert same_answer("\\frac{1}{2}", "\\frac{1}{2}", "math")  # equal text: no math-verify needed
    assert same_answer("18", "18.0", None) and same_answer("x + 1", "x+1", None) and not same_answer("x", "y", None)
    assert same_answer("", None) and not same_answer("", "4") and not same_answer(None, "4", "integer")


def test_min_certifiable_n_is_the_least_n_with_no_loss():
    for r, a in [(0.02, 0.05), (0.05, 0.05), (0.1, 0.1), (0.01, 0.01), (0.5, 0.5)]:
        n = min_certifiable_n(r, a)
        assert (1 - r) ** n <= a < (1 - r) ** (n - 1)
    assert min_certifiable_n(0.02, 0.05) == 149  # ~3/n: the rule of three


def _population(size: int, risks: list[float], rng: np.random.Generator) -> np.ndarray:
    """0/1 losses of candidates with exactly these true risks on a population of ``size``."""
    loss = np.zeros((len(risks), size), dtype=bool)
    for i, r in enumerate(risks):
        loss[i, rng.choice(size, round(r * size), replace=False)] = True
    return loss


def test_learn_then_test_controls_the_false_certification_rate():
    # candidates from cautious to aggressive: risk grows as cost falls, straddling max_risk = 0.05
    rng = np.random.default_rng(7)
    risks = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.10]
    size, n, draws, max_risk, alpha = 4000, 200, 600, 0.05, 0.1
    loss = _population(size, risks, rng)
    cost = np.repeat(np.linspace(100, 10, len(risks))[:, None], size, axis=1)
    vanilla = np.full(size, 110.0)
    true_risk = loss.mean(axis=1)
    ltt_over = naive_over = certified_any = 0
    for _ in range(draws):
        sample = rng.choice(size, n, replace=False)
        ordering, testing = sample[:60], sample[60:]
        res = learn_then_test(loss, cost, vanilla, ordering, testing, max_risk=max_risk, alpha=alpha)
        certified_any += res.chosen is not None
        ltt_over += res.chosen is not None and true_risk[res.chosen] > max_risk
        # the rule without a guarantee: the cheapest setting whose measured risk is within the level
        measured = loss[:, sample].mean(axis=1)
        naive = max(i for i in range(len(risks)) if measured[i] <= max_risk)
        naive_over += true_risk[naive] > max_risk
    # alpha plus three binomial standard errors of the simulation
    assert ltt_over / draws <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)
    assert certified_any / draws > 0.9  # and it is not vacuous: it certifies something almost always
    assert naive_over / draws > 0.3  # choosing by the measured risk overshoots far more often than alpha


def test_learn_then_test_stops_at_the_first_failure():
    # in order: 0 passes, 1 fails, 2 would pass but is never reached; 3 costs more than vanilla: never tested
    loss = np.zeros((4, 200), dtype=bool)
    loss[1, 50:125] = True  # no loss on the ordering part (columns 0-49), half of the testing part
    cost = np.array([[90.0] * 200, [50.0] * 200, [10.0] * 200, [120.0] * 200])
    ordering, testing = np.arange(50), np.arange(50, 200)
    res = learn_then_test(loss, cost, np.full(200, 100.0), ordering, testing, max_risk=0.05, alpha=0.05)
    assert res.order == [0, 1, 2] and res.skipped == [3]
    assert res.n_certified == 1 and res.n_tested == 2 and res.chosen == 0
    assert res.p_values[0] == pytest.approx(0.95 ** 150) and res.p_values[1] > 0.99 and res.p_values[2] < 0.05


def _ladder_trace(i: int, right_from: int, labelled: bool = True) -> dict:
    """Probes every 100 tokens up to 1000; the answer is the final one ("42") from ``right_from`` on."""
    probes = [{"position": pos, "confidence": 0.5, "answer": "42" if pos >= right_from else "7",
               "correct": (pos >= right_from) if labelled else None, "probe_tokens": 4} for pos in range(100, 1001, 100)]
    return {"id": f"t{i}", "grading": "integer", "probes": probes, "final_answer": "42",
            "final_correct": True if labelled else None, "reasoning_tokens": 1000}


def _write(path: Path, right_from: list[int], labelled: bool = True) -> Path:
    path.write_text("".join(json.dumps(_ladder_trace(i, r, labelled)) + "\n" for i, r in enumerate(right_from)))
    return path


BUDGETS = [{"method": "budget", "budget": b} for b in (300, 500, 700)]


def test_calibrate_certifies_the_known_budget(tmp_path):
    # every answer is final from 500 tokens on, half of them from 300: budget 500 changes nothing, 300 half
    traces = [trace_from_json(_ladder_trace(i, r), f"x:{i}") for i, r in enumerate([500, 300] * 100)]
    result = calibrate(traces, risk="changed", max_risk=0.05, alpha=0.05, candidates=BUDGETS)
    assert result["policy"] == {"method": "budget", "budget": 500}
    assert (result["n"], result["n_ordering"], result["n_testing"]) == (200, 60, 140)
    assert sorted(result["ordering_ids"] + result["testing_ids"]) == sorted(t.id for t in traces)
    tested = {c["label"]: c for c in result["candidates"]}
    assert tested["budget budget=500"]["certified"] and tested["budget budget=500"]["p_value"] == pytest.approx(0.95 ** 140)
    assert not tested["budget budget=300"]["certified"] and tested["budget budget=300"]["tested"]
    ch = result["chosen"]
    # one shape: the saving a fraction, as every candidate's; its interval beside it
    assert ch["saving"] == pytest.approx(0.5) == ch["saving_interval"]["estimate"] and isinstance(tested["budget budget=300"]["saving"], float)
    assert ch["risk_observed"] == 0.0 and ch["changed"] == 0
    assert ch["net_accuracy_drop"] == 0.0 and ch["lost"] == 0
    assert result["statement"].startswith("With probability at least 0.95 over the draw of these 200 calibration traces, "
                                          "budget budget=500 changes the answer")
    assert "60 of the 200" in result["statement"] and "other 140" in result["statement"]
    assert "| budget budget=300 |" in format_report(result)
    # the same traces under the risk lost (labelled): budget 300 loses half, 500 nothing
    assert calibrate(traces, risk="lost", max_risk=0.05, alpha=0.05, candidates=BUDGETS)["policy"]["budget"] == 500


def test_calibrate_refuses_and_says_how_many_traces_it_would_take():
    traces = [trace_from_json(_ladder_trace(i, 500), f"x:{i}") for i in range(40)]
    result = calibrate(traces, risk="changed", max_risk=0.02, alpha=0.05, candidates=BUDGETS)
    assert result["policy"] == {"method": "vanilla"} and not result["chosen"]["certified"] and result["n_certified"] == 0
    assert result["min_n_testing"] == 149 and result["chosen"]["saving"] == 0.0
    st = result["statement"]
    assert st.startswith("No setting is certified") and "at least 149 testing traces" in st
    assert f"{math.ceil(149 / 0.7)} calibration traces" in st and "these 28 could not certify it whatever they showed" in st
    for bad in ({"max_risk": 0.0}, {"max_risk": 1.0}, {"alpha": 1.5}, {"ordering_fraction": 1.0}):
        with pytest.raises(CodestopError, match="strictly between 0 and 1"):
            calibrate(traces, **{"max_risk": 0.1, "alpha": 0.1, **bad})
    with pytest.raises(CodestopError, match="at least 2"):
        calibrate(traces[:1], max_risk=0.1, alpha=0.1, candidates=BUDGETS)
    with pytest.raises(CodestopError, match="risk"):
        calibrate(traces, risk="drop", max_risk=0.1, alpha=0.1)


def test_unlabelled_traces_calibrate_changed_and_refuse_lost(tmp_path):
    path = _write(tmp_path / "shadow.jsonl", [500, 300] * 100, labelled=False)
    result = calibrate(path, risk="changed", max_risk=0.05, alpha=0.05, candidates=BUDGETS)
    assert result["policy"]["budget"] == 500 and result["traces"] == str(path)
    assert "net_accuracy_drop" not in result["chosen"] and "unlabelled" in result["statement"]
    with pytest.raises(CodestopError, match="risk 'lost' needs labelled traces"):
        calibrate(path, risk="lost", max_risk=0.05, alpha=0.05, candidates=BUDGETS)
    assert main(["calibrate", str(path), "--risk", "lost", "--max-risk", "0.05"]) == 2
    # what needs to know the right answers says so, rather than counting unknown as wrong
    from codestop.analysis.calibrate import calibrate_by_drop
    from codestop.analysis.sweep import sweep
    from codestop.traces import load_traces

    traces = load_traces(path)
    with pytest.raises(CodestopError, match="needs labelled traces"):
        sweep(traces, {"budget": [500]})
    with pytest.raises(CodestopError, match="needs labelled traces"):
        calibrate_by_drop(traces, 0.01, method="budget", values=[500])


def test_the_default_grid_spans_methods_and_the_ceiling():
    grid = candidate_grid()
    methods = {c["method"] for c in grid}
    assert methods == {"codestop", "deer", "consistency"}
    ceilings = {(c["r_min"], c["r_max"]) for c in grid if c["method"] == "codestop"}
    assert (1.0, 1.0) in ceilings and (0.9, 0.95) in ceilings and all(a <= b for a, b in ceilings)
    # every candidate names all its knobs, defaults included
    assert set(grid[0]) == {"method", "tau", "delta", "r_min", "r_max", "ramp_steps", "variant", "confidence", "answer_from"}
    small = candidate_grid(["codestop"], {"tau": [2.0, 4.0], "r_max": [0.9, 1.0], "r_min": [0.9]}, {"variant": "reference"})
    assert [(c["tau"], c["r_max"], c["variant"]) for c in small] == [(2.0, 0.9, "reference"), (2.0, 1.0, "reference"),
                                                                     (4.0, 0.9, "reference"), (4.0, 1.0, "reference")]
    with pytest.raises(CodestopError, match="no knob"):
        candidate_grid(["vanilla"])
    with pytest.raises(CodestopError, match="tau: a range for a knob none of the methods"):
        candidate_grid(["deer"], {"tau": [2.0]})
    with pytest.raises(CodestopError, match=r"candidates\[0\]\.tau: 3 is not an option of method 'deer'"):
        calibrate([trace_from_json(_ladder_trace(i, 500), f"x:{i}") for i in range(4)], max_risk=0.1, alpha=0.1,
                  candidates=[{"method": "deer", "tau": 3}])


def test_outcomes_on_the_committed_testbed_agree_with_replay():
    from codestop.analysis.sweep import run_policy
    from codestop.traces import load_traces

    traces = load_traces(TESTBED)[:60]
    cands = candidate_grid(["codestop", "deer"], {"tau": [4.0], "r_min": [1.0], "r_max": [1.0], "threshold": [0.9]})
    out = outcomes(traces, cands)
    for i, c in enumerate(cands):
        rows = run_policy(traces, make_policy(c["method"], **{k: v for k, v in c.items() if k != "method"}))
        assert list(out.cost[i]) == [r.cost_tokens for r in rows]
        assert list(out.lost[i]) == [r.stop_index is not None and t.final_correct and not r.correct for r, t in zip(rows, traces)]
        assert list(out.changed[i]) == [r.stop_index is not None and bool(r.changed) for r in rows]
        # changed means a different answer, compared as integers: never the same text
        assert all(r.answer != t.final_answer for r, t, ch in zip(rows, traces, out.changed[i]) if ch)
    ordering, testing = split(60, 0.3, 0)
    assert len(ordering) == 18 and len(testing) == 42 and not set(ordering) & set(testing)


def test_cli_writes_a_policy_file_that_replay_reads(tmp_path, capsys):
    path = _write(tmp_path / "t.jsonl", [500, 300] * 100)
    out = tmp_path / "policy.json"
    assert main(["calibrate", str(path), "--method", "budget", "--budget", "300,500,700", "--max-risk", "0.05",
                 "--alpha", "0.05", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("With probability at least 0.95") and "| budget budget=300 |" in printed.out
    pf = read_policy_file(out)
    assert pf.policy == {"method": "budget", "budget": 500} and make_policy(pf.policy).budget == 500
    g = pf.guarantee
    assert g is not None and (g["risk"], g["max_risk"], g["alpha"], g["n_ordering"], g["n_testing"]) == ("changed", 0.05, 0.05, 60, 140)
    assert g["traces"] == str(path) and g["certified"] and "calibrated: changed risk <= 0.05" in pf.describe()
    assert main(["replay", str(path), "--policy-file", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["mean_reasoning_tokens"] == 500
    assert main(["calibrate", str(path), "--method", "budget", "--max-risk", "0.05", "--json"]) == 0
    # the default range 64:1024:64; in replay a budget stops at the first probe at or past it: 448, the
    # one budget in (400, 500], stops at 500 and changes no answer, 512 stops at 600 and costs more,
    # 384 stops at 400, before half the answers (the traces, the split and the test are fixed: one outcome)
    assert json.loads(capsys.readouterr().out)["policy"]["budget"] == 448
    # nonsense is one clear message, exit status 2
    for bad in (["--max-risk", "0"], ["--max-risk", "0.1", "--alpha", "1"], [], ["--max-risk", "0.1", "--method", "nope"],
                ["--max-risk", "x"]):
        with pytest.raises(SystemExit) if bad == ["--max-risk", "x"] else contextlib.nullcontext():
            assert main(["calibrate", str(path), *bad]) == 2
    err = capsys.readouterr().err
    assert "--max-risk: give the risk level" in err and "strictly between 0 and 1" in err



GOOD_GUARANTEE = {"risk": "changed", "max_risk": 0.05, "alpha": 0.05, "n_ordering": 60, "n_testing": 140}


@pytest.mark.parametrize("change, said", [
    ({"alpha": "0.05"}, "guarantee.alpha: '0.05' must be a number strictly between 0 and 1"),
    ({"n_ordering": "many"}, "guarantee.n_ordering: 'many' must be an integer >= 0"),
    ({"max_risk": "low"}, "guarantee.max_risk: 'low' must be a number strictly between 0 and 1"),
    ({"max_risk": math.nan}, "guarantee.max_risk: nan must be a number strictly between 0 and 1"),
    ({"alpha": 3}, "guarantee.alpha: 3 must be a number strictly between 0 and 1"),
    ({"risk": "wrong"}, "guarantee.risk: 'wrong' must be one of changed, lost"),
    ({"alpha": None}, "guarantee: no 'alpha'"),
    ({"maxrisk": 0.05}, "guarantee.maxrisk: not a key of a guarantee"),
    ({"certified": "yes"}, "guarantee.certified: 'yes' must be true or false"),
    ({"policy": {"method": "deer", "threshold": 0.5}}, "the guarantee was certified for {'method': 'deer', 'threshold': 0.5}, not for"),
    ({"policy": {"method": "budget", "tau": 3}}, "guarantee.policy: tau: 3 is not an option of method 'budget'"),
])
def test_a_policy_file_with_a_bad_guarantee_is_one_clear_error(tmp_path, capsys, change, said):
    # each was accepted (announced as "calibrated") or a traceback at start-up before the block was checked
    guarantee = {k: v for k, v in {**GOOD_GUARANTEE, **change}.items() if v is not None}
    policy = {"method": "budget", "budget": 500}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"schema": 1, "kind": "codestop-policy", "policy": policy, "guarantee": guarantee}))
    with pytest.raises(CodestopError) as err:
        read_policy_file(path)
    assert said in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CodestopError, match="guarantee"):
        write_policy_file(tmp_path / "other.json", policy, guarantee)
    assert not (tmp_path / "other.json").exists()
    traces = _write(tmp_path / "t.jsonl", [500] * 4)
    assert main(["replay", str(traces), "--policy-file", str(path)]) == 2  # the message alone, no traceback
    assert said in capsys.readouterr().err


def test_a_guarantee_names_the_policy_it_was_certified_for(tmp_path):
    path = _write(tmp_path / "t.jsonl", [500, 300] * 100)
    result = calibrate(path, risk="changed", max_risk=0.05, alpha=0.05, candidates=BUDGETS)
    assert result["guarantee"]["policy"] == result["policy"] == {"method": "budget", "budget": 500}
    pf = write_policy_file(tmp_path / "p.json", result["policy"], result["guarantee"])
    assert read_policy_file(tmp_path / "p.json") == pf and isinstance(pf.guarantee["saving"], float)
    # a file written before the guarantee named its policy still reads
    older = {k: v for k, v in result["guarantee"].items() if k != "policy"}
    assert write_policy_file(tmp_path / "old.json", result["policy"], older).guarantee == older


def test_a_guarantee_made_in_python_is_checked_too():
    # create_app(policy=PolicyFile(...)) took a NaN max_risk, and /health then answered 500 on every call
    with pytest.raises(CodestopError, match="guarantee.max_risk: nan must be a number"):
        PolicyFile({"method": "budget", "budget": 500}, {**GOOD_GUARANTEE, "max_risk": math.nan})
    assert PolicyFile({"method": "budget", "budget": 500}, GOOD_GUARANTEE).describe().endswith("for traffic like its 200 calibration traces")


def test_calibrate_reads_several_trace_files_and_globs_as_one(tmp_path, capsys):
    # traces from several proxy hosts calibrate together: the testbed split over three files, named by a
    # path and a glob, calibrates exactly as the one file does
    lines = [line for line in TESTBED.read_text().splitlines() if line.strip()]
    for host in range(3):
        (tmp_path / f"host{host}").mkdir()
        (tmp_path / f"host{host}" / "shadow.traces.jsonl").write_text("\n".join(lines[host::3][:40]) + "\n")
    whole = tmp_path / "whole.traces.jsonl"
    whole.write_text("".join((tmp_path / f"host{h}" / "shadow.traces.jsonl").read_text() for h in range(3)))
    common = ["--method", "codestop", "--tau", "3,6", "--r-max", "1", "--max-risk", "0.2", "--json"]
    assert main(["calibrate", str(whole), *common]) == 0
    one = json.loads(capsys.readouterr().out)
    host0 = str(tmp_path / "host0" / "shadow.traces.jsonl")
    assert main(["calibrate", host0, str(tmp_path / "host*" / "shadow.traces.jsonl"), *common]) == 0
    several = json.loads(capsys.readouterr().out)
    assert several["n"] == one["n"] == 120  # host0 named twice, read once
    assert several["policy"] == one["policy"] and several["candidates"] == one["candidates"]
    assert several["guarantee"]["traces"] == f"{host0} {tmp_path / 'host*' / 'shadow.traces.jsonl'}"
    assert main(["calibrate", str(tmp_path / "nohost*" / "x.jsonl"), *common]) == 2
    assert "matches no file" in capsys.readouterr().err
