"""Traces and replay: record runs to the end with a probe at every boundary; replay applies a policy
exactly as live (same stop step); minimal traces follow the documented rules; the --json shape is
exact; empty and cut-short files are never read quietly; replay loads no engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codestop.cli import main
from codestop.errors import CodestopError
from codestop.policies import CodeStop, Consistency, Deer, Vanilla
from codestop.replay import replay, replay_trace, rescored
from codestop.traces import load_traces, trace_from_json

COMMITTED = Path(__file__).resolve().parents[1] / "bench" / "results" / "gsm8k-qwen2.5-coder-0.5b.traces.jsonl"


@pytest.fixture(scope="module")
def gen():
    from codestop.config import GenerationConfig

    return GenerationConfig(family="plain", max_reasoning_tokens=40, probe_interval=1, boundaries=(" ",), temperature=0.0)


@pytest.fixture(scope="module")
def recorded(tiny_engine, tmp_path_factory, gen):
    from codestop.eval.runner import record

    d = tmp_path_factory.mktemp("traces")
    data = d / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "4"}) + "\n" for q in ("What is 2 + 2?", "Add two and two.")))
    out = d / "traces.jsonl"
    record(tiny_engine, data=data, out=out, generation=gen)
    return data, out


def test_record_stores_every_probe_and_the_final_answer(recorded):
    _, out = recorded
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2
    for t in lines:
        assert t["schema"] == 1 and t["id"].startswith("q:")
        # the stop reason under its name, and for one release under the name traces used before
        assert t["stop_reason"] == t["finish_reason"] and t["stop_reason"] in ("finished", "max_reasoning_tokens")
        assert t["reasoning_tokens"] >= t["probes"][-1]["position"]
        assert t["tokens"]["reasoning"] == t["reasoning_tokens"]  # the run's tokens by kind
        assert len(t["probes"]) >= 3  # a space every few tokens: many boundaries
        for p in t["probes"]:
            assert set(p) == {"position", "confidence", "answer", "correct", "probe_tokens", "token_logprobs", "text"}
            assert isinstance(p["correct"], bool) and p["probe_tokens"] >= 1
        positions = [p["position"] for p in t["probes"]]
        assert positions == sorted(positions)
        assert t["config"]["policy"] == {"method": "vanilla"} and t["config"]["generation"]["probe_interval"] == 1
        ref = t["reference"]  # the same probe at the end of the full reasoning, its cost counted as a probe's
        assert set(ref) == set(t["probes"][0]) and ref["position"] == t["reasoning_tokens"] and ref["probe_tokens"] >= 1
    assert sum(p.probe_tokens for p in load_traces(out)[0].probes) + lines[0]["reference"]["probe_tokens"] == lines[0]["tokens"]["probe"]
    assert [t.stop_reason for t in load_traces(out)] == [t["stop_reason"] for t in lines]


@pytest.mark.parametrize("make", [
    lambda c: CodeStop(tau=c["tau"]),
    lambda c: CodeStop(tau=c["tau"], variant="reference"),
    lambda c: Deer(threshold=c["deer"]),
    lambda c: Consistency(window=2),
])
def test_replay_equals_live(tiny_engine, recorded, gen, make):
    from codestop.api import generate

    _, out = recorded
    traces = load_traces(out)
    trace = traces[0]
    # choose knobs that stop part-way through this trace, so the test checks a real stop step
    geo = [p.confidence for p in trace.probes]
    choices = {"deer": sorted(geo)[len(geo) // 2], "tau": None}
    for tau in [x / 4 for x in range(1, 60)]:
        r = replay_trace(trace, CodeStop(tau=tau))
        if r.stop_index is not None and 0 < r.stop_index < len(trace.probes) - 1:
            choices["tau"] = tau
            break
    assert choices["tau"] is not None
    policy = make(choices)
    replayed = replay_trace(trace, policy)
    live = generate(tiny_engine, "What is 2 + 2?", policy, gen)
    if replayed.stop_index is None:
        assert live.stop_reason in ("finished", "max_reasoning_tokens")
        assert len(live.probes) == len(trace.probes)
    else:
        assert len(live.probes) - 1 == replayed.stop_index
        assert live.stop_reason == replayed.stop_reason
        assert live.tokens["reasoning"] == replayed.reasoning_tokens
    # live and replay score a probe with the same function: the same confidences, probe by probe
    seen = rescored(trace.probes, policy.confidence)[: len(live.probes)]
    assert [p.confidence for p in live.probes] == pytest.approx([p.confidence for p in seen])
    if isinstance(policy, (CodeStop, Deer)):
        assert replayed.stop_index is not None


def test_replay_rescores_confidence_from_logprobs():
    lps = [-0.01, -0.02]
    t = trace_from_json({"id": "a", "probes": [
        {"position": 5, "confidence": 0.0, "answer": "4", "correct": True, "token_logprobs": lps, "probe_tokens": 3},
    ]}, "x:1")
    # the stored confidence (0) would never pass 0.95; the re-scored geometric mean (0.985) does
    r = replay_trace(t, CodeStop())
    assert (r.stop_index, r.stop_reason, r.correct, r.reasoning_tokens, r.cost_tokens) == (0, "confident", True, 5, 8)
    # a log-probability a little above 0 (an engine's rounding) is clamped, as live
    t = trace_from_json({"id": "b", "probes": [
        {"position": 5, "confidence": 0.0, "answer": "4", "correct": True, "token_logprobs": [1e-7, -0.01]}]}, "x:2")
    assert replay_trace(t, Deer(threshold=0.99)).stop_reason == "threshold"


# probe tokens under their name, and under the legacy "tokens" key (traces recorded before the rename)
MINIMAL = [
    {"id": "stops", "probes": [
        {"position": 10, "confidence": 0.2, "answer": "1", "correct": False, "probe_tokens": 4},
        {"position": 30, "confidence": 0.99, "answer": "4", "correct": True, "probe_tokens": 3},
        {"position": 60, "confidence": 0.5, "answer": "5", "correct": False, "probe_tokens": 3},
    ]},
    {"id": "never", "probes": [
        {"position": 12, "confidence": 0.3, "answer": "2", "correct": True, "tokens": 2},
        {"position": 50, "confidence": 0.4, "answer": "7", "correct": False},
    ]},
    {"id": "full", "final_correct": True, "reasoning_tokens": 90, "probes": [
        {"position": 20, "confidence": 0.1, "answer": "3", "correct": False, "tokens": 5},
    ]},
]


def _write(path: Path, traces) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    return path


def test_replay_rules_on_minimal_traces(tmp_path):
    path = _write(tmp_path / "min.jsonl", MINIMAL)
    result = replay(path, CodeStop(tau=100))
    rows = {t["id"]: t for t in result["traces"]}
    # no final answer and no reference probe: whether the stop changed the answer is unknown
    assert rows["stops"] == {"id": "stops", "stop_index": 1, "stop_reason": "confident", "answer": "4", "correct": True,
                             "changed": None, "reasoning_tokens": 30, "cost_tokens": 37}
    # never stops, no final answer: scored by the last probe, reasoning tokens = its position; nothing was cut
    assert rows["never"] == {"id": "never", "stop_index": None, "stop_reason": None, "answer": "7", "correct": False,
                             "changed": False, "reasoning_tokens": 50, "cost_tokens": 52}
    # never stops, a final answer: scored by it, reasoning tokens = the full reasoning
    assert rows["full"] == {"id": "full", "stop_index": None, "stop_reason": None, "answer": None, "correct": True,
                            "changed": False, "reasoning_tokens": 90, "cost_tokens": 95}
    s = result["summary"]
    assert s == {"n": 3, "accuracy": pytest.approx(2 / 3), "mean_reasoning_tokens": pytest.approx(170 / 3),
                 "mean_cost_tokens": pytest.approx((30 + 7 + 50 + 2 + 90 + 5) / 3)}
    # vanilla spends no probes live, so its cost carries none
    assert replay(path, Vanilla())["summary"]["mean_cost_tokens"] == pytest.approx((60 + 50 + 90) / 3)


def test_replay_json_shape(tmp_path, capsys):
    path = _write(tmp_path / "min.jsonl", MINIMAL)
    assert main(["replay", str(path), "--method", "deer", "--threshold", "0.9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"summary", "traces"}
    assert set(out["summary"]) == {"n", "accuracy", "mean_reasoning_tokens", "mean_cost_tokens"}
    assert all(set(t) == {"id", "stop_index", "stop_reason", "answer", "correct", "changed", "reasoning_tokens", "cost_tokens"}
               for t in out["traces"])
    assert out["traces"][0]["stop_reason"] == "threshold" and out["traces"][0]["stop_index"] == 1


def test_replay_reports_the_answer_at_the_stop_against_the_reference():
    probes = [{"position": 10, "confidence": 0.99, "answer": "18.0", "correct": None},
              {"position": 20, "confidence": 0.2, "answer": "20", "correct": None}]
    # unlabelled (a shadow trace): no gold, so correct is null; the reference is the final answer
    shadow = trace_from_json({"id": "s", "grading": "integer", "probes": probes, "final_answer": "18",
                              "reasoning_tokens": 40}, "x:1")
    r = replay_trace(shadow, Deer(threshold=0.9))
    assert (r.stop_index, r.answer, r.correct, r.changed) == (0, "18.0", None, False)  # 18.0 and 18 are one integer
    # a reference probe, taken at the end of the full reasoning, is the reference when present
    probed = trace_from_json({"id": "p", "grading": "integer", "probes": probes, "final_answer": "18", "reasoning_tokens": 40,
                              "reference": {"position": 40, "confidence": 0.9, "answer": "21"}}, "x:2")
    assert probed.reference_answer == "21" and replay_trace(probed, Deer(threshold=0.9)).changed is True
    never = replay_trace(shadow, Vanilla())
    assert (never.answer, never.changed, never.correct, never.reasoning_tokens) == ("18", False, None, 40)
    assert replay([shadow], Deer(threshold=0.9))["summary"]["accuracy"] is None  # unknown, not 0


def test_bad_traces_are_named(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MINIMAL[0]) + "\n\n" + json.dumps({"id": "b", "probes": [{"position": 3, "answer": "1", "correct": True}]}) + "\n")
    with pytest.raises(CodestopError, match=rf"{path}:3: probe 0 has no 'confidence'"):  # the file's line
        load_traces(path)
    back = _write(tmp_path / "back.jsonl", [{"id": "c", "probes": [
        {"position": 9, "confidence": 0.1, "answer": "", "correct": False},
        {"position": 3, "confidence": 0.1, "answer": "", "correct": False}]}])
    assert main(["replay", str(back)]) == 2
    assert "goes backwards" in capsys.readouterr().err


def test_an_empty_trace_file_is_an_error(tmp_path, capsys):
    for text in ("", "\n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        with pytest.raises(CodestopError, match=rf"no traces in {path}"):
            load_traces(path)
    assert main(["replay", str(path)]) == 2
    assert f"no traces in {path}" in capsys.readouterr().err
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"id": "a", "probes": [')  # one line, cut short: nothing left
    with pytest.raises(CodestopError, match="no traces in"):
        load_traces(cut)


def test_a_cut_last_line_is_dropped_saying_so(tmp_path, capsys):
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in MINIMAL[:2]) + json.dumps(MINIMAL[2])[:30])
    assert [t.id for t in load_traces(path)] == ["stops", "never"]
    err = capsys.readouterr().err
    assert f"{path}:3: the last line is not a complete JSON object" in err and "ignored" in err
    assert path.read_text().endswith(json.dumps(MINIMAL[2])[:30])  # replay never writes the file
    assert main(["replay", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"]["n"] == 2 and f"{path}:3" in captured.err


def test_the_committed_traces_stay_readable():
    # recorded before probe tokens had their own name: each probe's "tokens" is read as probe_tokens
    traces = load_traces(COMMITTED)
    assert len(traces) == 157
    assert all(p.probe_tokens is not None and p.probe_tokens >= 1 for t in traces for p in t.probes)
    t = traces[0]
    assert t.stop_reason == "finished"  # written as finish_reason, before the stop reason had its one name
    row = replay_trace(t, CodeStop())
    upto = len(t.probes) if row.stop_index is None else row.stop_index + 1
    assert row.cost_tokens == row.reasoning_tokens + sum(p.probe_tokens for p in t.probes[:upto])


def test_replay_imports_no_engine():
    code = (
        "import sys, codestop.replay, codestop.analysis.sweep, codestop.analysis.calibrate\n"
        # the controller comes for cost_tokens (the one cost definition) and brings no engine with it
        "bad = [m for m in sys.modules if m.startswith(('codestop.engines', 'codestop.api', "
        "'codestop.models', 'codestop.eval.runner')) or m in ('torch', 'numpy', 'transformers', 'llama_cpp')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_answer_from_best_scores_the_most_confident_probe_up_to_the_stop():
    from codestop.policies import Probe
    from codestop.traces import Trace

    probes = (
        Probe(position=10, confidence=0.90, answer="5", correct=True, probe_tokens=2),
        Probe(position=20, confidence=0.30, answer="6", correct=False, probe_tokens=2),
        Probe(position=30, confidence=0.50, answer="7", correct=False, probe_tokens=2),
        Probe(position=40, confidence=0.60, answer="7", correct=False, probe_tokens=2),
    )
    trace = Trace("t", probes, final_correct=False, reasoning_tokens=50)
    at_stop = replay_trace(trace, Consistency(window=2, confidence="geometric"))
    best = replay_trace(trace, Consistency(window=2, confidence="geometric", answer_from="best"))
    assert at_stop.stop_index == best.stop_index == 3
    assert at_stop.correct is False and best.correct is True
    # the cost still counts the reasoning and probes up to the stop
    assert best.reasoning_tokens == at_stop.reasoning_tokens == 40 and best.cost_tokens == at_stop.cost_tokens == 48


@pytest.mark.parametrize("interval", [3, 7])
def test_a_trace_thinned_to_an_interval_is_what_live_probes_at_it(tiny_engine, recorded, gen, interval):
    """Recorded at every boundary, replayed at --probe-interval K: the probes kept are exactly
    the ones a live run at K makes (positions and confidences)."""
    from codestop.api import generate

    _, out = recorded
    trace = load_traces(out, probe_interval=interval)[0]
    live = generate(tiny_engine, "What is 2 + 2?", Vanilla(), gen.replace(probe_interval=interval, always_probe=True))
    assert 0 < len(trace.probes) < len(load_traces(out)[0].probes)
    assert [p.position for p in live.probes] == [p.position for p in trace.probes]
    assert [p.confidence for p in live.probes] == pytest.approx([p.confidence for p in trace.probes])
    assert all(b.position - a.position >= interval for a, b in zip(trace.probes, trace.probes[1:]))


def test_probe_interval_on_the_replay_command_line(tmp_path, capsys):
    path = _write(tmp_path / "min.jsonl", MINIMAL)
    assert main(["replay", str(path), "--method", "vanilla", "--probe-interval", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["n"] == 3
    assert main(["replay", str(path), "--probe-interval", "0"]) == 2
    assert "probe_interval" in capsys.readouterr().err
