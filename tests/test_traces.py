"""Traces: record runs to the end with a probe at every boundary; replay applies a policy exactly as
live (same stop step); minimal traces follow the documented rules; the --json shape is exact."""

from __future__ import annotations

import json

import pytest

from codestop.api import generate
from codestop.cli import main
from codestop.engines.base import CodestopError
from codestop.evaluate import GenerationOptions
from codestop.policies import CodeStop, Consistency, Deer, Vanilla
from codestop.traces import load_traces, record, replay, replay_trace, trace_from_json

GEN = GenerationOptions(family="plain", max_new_tokens=40, probe_interval=1, boundaries=(" ",), temperature=0.0)


@pytest.fixture(scope="module")
def recorded(tiny_engine, tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    data = d / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "4"}) + "\n" for q in ("What is 2 + 2?", "Add two and two.")))
    out = d / "traces.jsonl"
    record(tiny_engine, data=data, out=out, generation=GEN)
    return data, out


def test_record_stores_every_probe_and_the_final_answer(recorded):
    _, out = recorded
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2
    for t in lines:
        assert t["schema"] == 1 and t["id"].startswith("q:")
        assert t["finish_reason"] in ("finished", "budget")
        assert t["reasoning_tokens"] >= t["probes"][-1]["position"]
        assert len(t["probes"]) >= 3  # a space every few tokens: many boundaries
        for p in t["probes"]:
            assert {"position", "confidence", "answer", "correct", "tokens", "token_logprobs", "text"} <= set(p)
            assert isinstance(p["correct"], bool) and p["tokens"] >= 1
        positions = [p["position"] for p in t["probes"]]
        assert positions == sorted(positions)
        assert t["config"]["method"] == {"method": "vanilla"} and t["config"]["generation"]["probe_interval"] == 1


def _live(engine, question, policy):
    return generate(engine, question, policy, **GEN.as_kwargs())


@pytest.mark.parametrize("make", [
    lambda c: CodeStop(tau=c["tau"]),
    lambda c: CodeStop(tau=c["tau"], variant="reference"),
    lambda c: Deer(threshold=c["deer"]),
    lambda c: Consistency(window=2),
])
def test_replay_equals_live(tiny_engine, recorded, make):
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
    live = _live(tiny_engine, "What is 2 + 2?", policy)
    if replayed.stop_index is None:
        assert live.stop_reason in ("finished", "budget")
        assert len(live.probes) == len(trace.probes)
    else:
        assert len(live.probes) - 1 == replayed.stop_index
        assert live.stop_reason == replayed.stop_reason
        assert live.stop_position == replayed.tokens
    if isinstance(policy, (CodeStop, Deer)):
        assert replayed.stop_index is not None


def test_replay_rescores_confidence_from_logprobs():
    lps = [-0.01, -0.02]
    t = trace_from_json({"id": "a", "probes": [
        {"position": 5, "confidence": 0.0, "answer": "4", "correct": True, "token_logprobs": lps, "tokens": 3},
    ]}, "x:1")
    # the stored confidence (0) would never pass 0.95; the re-scored geometric mean (0.985) does
    r = replay_trace(t, CodeStop())
    assert (r.stop_index, r.stop_reason, r.correct, r.tokens, r.cost) == (0, "confident", True, 5, 8)


MINIMAL = [
    {"id": "stops", "probes": [
        {"position": 10, "confidence": 0.2, "answer": "1", "correct": False, "tokens": 4},
        {"position": 30, "confidence": 0.99, "answer": "4", "correct": True, "tokens": 3},
        {"position": 60, "confidence": 0.5, "answer": "5", "correct": False, "tokens": 3},
    ]},
    {"id": "never", "probes": [
        {"position": 12, "confidence": 0.3, "answer": "2", "correct": True, "tokens": 2},
        {"position": 50, "confidence": 0.4, "answer": "7", "correct": False},
    ]},
    {"id": "full", "final_correct": True, "reasoning_tokens": 90, "probes": [
        {"position": 20, "confidence": 0.1, "answer": "3", "correct": False, "tokens": 5},
    ]},
]


def test_replay_rules_on_minimal_traces(tmp_path):
    path = tmp_path / "min.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in MINIMAL))
    result = replay(path, CodeStop(tau=100))
    rows = {t["id"]: t for t in result["traces"]}
    assert rows["stops"] == {"id": "stops", "stop_index": 1, "stop_reason": "confident", "correct": True, "tokens": 30}
    # never stops, no final answer: scored by the last probe, tokens = its position
    assert rows["never"] == {"id": "never", "stop_index": None, "stop_reason": None, "correct": False, "tokens": 50}
    # never stops, a final answer: scored by it, tokens = the full reasoning
    assert rows["full"] == {"id": "full", "stop_index": None, "stop_reason": None, "correct": True, "tokens": 90}
    s = result["summary"]
    assert s == {"n": 3, "accuracy": pytest.approx(2 / 3), "mean_tokens": pytest.approx(170 / 3),
                 "mean_cost": pytest.approx((30 + 7 + 50 + 2 + 90 + 5) / 3)}
    # vanilla spends no probes live, so its cost carries none
    assert replay(path, Vanilla())["summary"]["mean_cost"] == pytest.approx((60 + 50 + 90) / 3)


def test_replay_json_shape(tmp_path, capsys):
    path = tmp_path / "min.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in MINIMAL))
    assert main(["replay", str(path), "--method", "deer", "--threshold", "0.9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"summary", "traces"}
    assert set(out["summary"]) == {"n", "accuracy", "mean_tokens", "mean_cost"}
    assert all(set(t) == {"id", "stop_index", "stop_reason", "correct", "tokens"} for t in out["traces"])
    assert out["traces"][0]["stop_reason"] == "threshold" and out["traces"][0]["stop_index"] == 1


def test_bad_traces_are_named(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MINIMAL[0]) + "\n" + json.dumps({"id": "b", "probes": [{"position": 3, "answer": "1", "correct": True}]}) + "\n")
    with pytest.raises(CodestopError, match=rf"{path}:2: probe 0 has no 'confidence'"):
        load_traces(path)
    back = tmp_path / "back.jsonl"
    back.write_text(json.dumps({"id": "c", "probes": [
        {"position": 9, "confidence": 0.1, "answer": "", "correct": False},
        {"position": 3, "confidence": 0.1, "answer": "", "correct": False}]}) + "\n")
    assert main(["replay", str(back)]) == 2
    assert "goes backwards" in capsys.readouterr().err
