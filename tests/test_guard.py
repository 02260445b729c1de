"""The guard (codestop/serve/guard.py, audit.py, store.py): audits of stopped answers, the watch,
the revert on its alarm, auto mode, segments, and one state shared by the workers.

Model-free here (a scripted engine whose probe answer depends on how far its reasoning got, so a
stop can change the answer, and a shift of the traffic is one assignment); the same against the
real vLLM in tests/test_guard_vllm.py."""

from __future__ import annotations

import logging
import sqlite3
import threading

import httpx
import pytest
from harness import InProcessProxy, metric, wait_for
from scripted import toy_tokenizer
from story import story_engine

from codestop.errors import ParameterError
from codestop.policy_file import PolicyFile
from codestop.serve.defaults import DEFAULT_CONFIG
from codestop.serve.options import ServeOptions
from codestop.serve.store import STORE_FILE, Store

SCRIPT = "Step one.\nStep two.\nStep three.\nStep four.\n"
CONFIG = DEFAULT_CONFIG.replace(probe_interval=1, boundaries=("\n",))
FIRST_PROBE = {"method": "codestop", "r_min": 0.0, "r_max": 0.0}  # stops at its first probe
NEVER = {"method": "codestop", "r_min": 1.0, "r_max": 1.0, "tau": 1000.0}  # never confident enough to stop
CLAIMS_5 = {"risk": "changed", "max_risk": 0.05, "alpha": 0.05}  # what the bad setting's file claims


def late_answer(reasoning: str) -> str:
    """The story's answer changes at step three: a stop before it changes the answer."""
    return "7" if "three" in reasoning else "5"


def ask(p: InProcessProxy, **kwargs) -> tuple[str, str]:
    r = p.client().chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Q?"}], max_tokens=64, **kwargs)
    return r.choices[0].message.content, r.usage.model_extra["codestop"]["stop_reason"]


def state(p: InProcessProxy, segment: str = "scripted") -> dict:
    return next(s for s in httpx.get(p.url + "/codestop/state").json()["segments"] if s["segment"] == segment)


def audited(p: InProcessProxy, n: int, segment: str = "scripted") -> None:
    """Wait until ``n`` audits of the segment are in (audits run after the answers, in the background)."""
    wait_for(lambda: (s := state(p, segment))["audits"] + s["audits_failed"] >= n or s["state"] != "serving", timeout=20)


def test_a_setting_that_changes_answers_alarms_and_the_proxy_then_answers_as_the_upstream_alone(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "codestop.serve")
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    p = InProcessProxy(engine, policy=PolicyFile(FIRST_PROBE, CLAIMS_5), audit_fraction=1.0, config=CONFIG)
    try:
        for n in range(1, 10):
            answer, reason = ask(p)
            if state(p)["state"] == "reverted":
                break
            assert reason == "confident" and answer.startswith("Step one.\n") and "two" not in answer  # stopped, as served
            audited(p, n)
        s = state(p)
        traces = s["traces"]
        # 3 changed audits: the first bets nothing (the bet is predictable), then 10.5x each: 110 >= 1/alpha = 20
        assert s["state"] == "reverted" and s["alarmed_at"] == 3 and s["audits_changed"] == 3 and n <= 4
        assert s["e_values"][-1][1] >= s["alarm_threshold"] == pytest.approx(20.0) and s["changed_interval"][0] > 0.05
        assert s["audit_cost_tokens"] > 0 and s["policy"] is None
        for _ in range(2):  # answered as the upstream alone: the whole script, nothing stopped or appended
            assert ask(p) == (SCRIPT, "finished")
        health = httpx.get(p.url + "/health").json()
        assert health["guard"]["reverted"] == ["scripted"] and health["guard"]["segments"]["scripted"]["alarms"] == 1
        m = p.metrics()
        assert metric(m, "codestop_guard_state", segment="scripted", state="reverted") == 1
        assert metric(m, "codestop_watch_alarms_total", segment="scripted") == 1
        assert metric(m, "codestop_audits_changed_total", segment="scripted") == 3
        alarms = [r for r in caplog.records if "ALARM" in r.getMessage()]
        assert len(alarms) == 1 and "scripted" in alarms[0].getMessage()
        assert state(p)["traces"] == traces + 2  # traces kept being recorded after the revert
    finally:
        p.stop()


def test_an_audit_trace_is_the_shadow_format_marked_audit_and_judged_as_calibration_judges(tmp_path):
    from codestop.policies import make_policy
    from codestop.replay import replay_trace
    from codestop.traces import trace_from_json

    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    p = InProcessProxy(engine, policy=PolicyFile(FIRST_PROBE, {**CLAIMS_5, "alpha": 0.01}), audit_fraction=1.0, config=CONFIG,
                       state_dir=tmp_path)
    try:
        ask(p)
        audited(p, 1)
    finally:
        p.stop()
    lines = Store(tmp_path).traces("scripted", 0)
    assert len(lines) == 1 and lines[0]["config"]["kind"] == "audit" and lines[0]["config"]["segment"] == "scripted"
    trace = trace_from_json(lines[0], "audit")
    assert [q.answer for q in trace.probes] == ["5", "5", "7", "7"] and trace.reference_answer == "7"
    assert trace.reasoning_tokens == len(toy_tokenizer().encode(SCRIPT))  # positions of the whole reasoning
    assert replay_trace(trace, make_policy(FIRST_PROBE)).changed is True


def test_a_setting_that_never_stops_is_audited_at_no_cost_and_never_alarms(tmp_path):
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    p = InProcessProxy(engine, policy=PolicyFile(NEVER, CLAIMS_5), audit_fraction=1.0, config=CONFIG)
    try:
        for n in range(1, 9):
            assert ask(p) == (SCRIPT, "finished")
            audited(p, n)
        s = state(p)
        assert s["state"] == "serving" and s["audits"] == 8 and s["audits_changed"] == 0 and s["audit_cost_tokens"] == 0
        assert s["alarmed_at"] is None and s["e_values"][-1][1] <= 1
    finally:
        p.stop()


def test_a_streamed_answer_is_audited_once_its_last_chunk_is_sent(tmp_path):
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    p = InProcessProxy(engine, policy=PolicyFile(FIRST_PROBE, CLAIMS_5), audit_fraction=1.0, config=CONFIG)
    try:
        chunks = list(p.client().chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Q?"}],
                                                         max_tokens=64, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("Step one.\n") and "two" not in text
        audited(p, 1)
        assert state(p)["audits_changed"] == 1 and state(p)["audit_cost_tokens"] > 0
    finally:
        p.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_the_client_has_its_whole_answer_before_its_audit_starts(stream):
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    story, release, started = engine.next_token, threading.Event(), threading.Event()

    def resumed_waits(history: list[int], prompt_len: int) -> int:  # the continuation waits for the test
        if "Step" in toy_tokenizer().decode(history[:prompt_len]):
            started.set()
            release.wait(10)
        return story(history, prompt_len)

    engine.next_token = resumed_waits
    p = InProcessProxy(engine, policy=PolicyFile(FIRST_PROBE, CLAIMS_5), audit_fraction=1.0, config=CONFIG)
    try:
        r = p.client().chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Q?"}], max_tokens=64,
                                               stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else r.choices[0].message.content
        assert text.startswith("Step one.") and "two" not in text  # the whole answer, as served
        assert started.wait(10) and p.app.state.served.guard.busy and state(p)["audits"] == 0
        release.set()
        audited(p, 1)
        assert state(p)["audits_changed"] == 1
    finally:
        release.set()
        p.stop()


def test_a_failed_audit_is_counted_once_and_never_retried(tmp_path):
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    story = engine.next_token

    def resumed_fails(history: list[int], prompt_len: int) -> int:  # the upstream fails the continuation
        if "Step" in toy_tokenizer().decode(history[:prompt_len]):
            raise RuntimeError("the upstream went away")
        return story(history, prompt_len)

    engine.next_token = resumed_fails
    p = InProcessProxy(engine, policy=PolicyFile(FIRST_PROBE, CLAIMS_5), audit_fraction=1.0, config=CONFIG)
    try:
        assert ask(p)[1] == "confident"
        audited(p, 1)
        wait_for(lambda: not p.app.state.served.guard.busy)
        s = state(p)
        assert (s["audits"], s["audits_failed"], s["state"]) == (0, 1, "serving")
        assert metric(p.metrics(), "codestop_audits_failed_total", segment="scripted") == 1
    finally:
        p.stop()


def test_audits_are_a_seeded_share_of_the_served_requests(tmp_path):
    engine = story_engine(toy_tokenizer(), SCRIPT, lambda r: "5")
    runs = []
    for _ in range(2):
        p = InProcessProxy(engine, policy=PolicyFile(NEVER, CLAIMS_5), audit_fraction=0.5, config=CONFIG)
        try:
            for _ in range(12):
                ask(p)
            runs.append(state(p)["audits"])
        finally:
            p.stop()
    assert runs[0] == runs[1] and 0 < runs[0] < 12


def test_segments_by_header_and_metadata_with_a_bounded_number_of_tags(tmp_path):
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    p = InProcessProxy(engine, policy=PolicyFile(NEVER, CLAIMS_5), audit_fraction=1.0, config=CONFIG, max_segments=1)
    try:
        ask(p)
        ask(p, extra_headers={"X-Codestop-Segment": "alpha"})
        ask(p, extra_body={"metadata": {"codestop_segment": "beta"}})  # past max_segments: shares scripted/other
        ask(p, extra_body={"metadata": {"codestop_segment": "alpha"}})
        names = {s["segment"]: s for s in httpx.get(p.url + "/codestop/state").json()["segments"]}
        assert set(names) == {"scripted", "scripted/alpha", "scripted/other"}
        wait_for(lambda: state(p, "scripted/alpha")["audits"] == 2)
        bad = httpx.post(p.url + "/v1/chat/completions", headers={"X-Codestop-Segment": "a/b"},
                         json={"model": "scripted", "messages": [{"role": "user", "content": "Q?"}]})
        assert bad.status_code == 400 and "X-Codestop-Segment" in bad.json()["error"]["message"]
    finally:
        p.stop()


def test_workers_share_one_state_and_a_revert_reaches_the_other_within_a_second(tmp_path):
    """Two apps over one state dir stand for two workers: the one that audits alarms, the other
    answers as the upstream alone within a second."""
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    options = dict(policy=PolicyFile(FIRST_PROBE, CLAIMS_5), audit_fraction=1.0, config=CONFIG, state_dir=tmp_path)
    one, two = InProcessProxy(engine, **options), InProcessProxy(engine, **options)
    try:
        assert ask(two)[1] == "confident"
        assert sqlite3.connect(tmp_path / STORE_FILE).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        for n in range(2, 9):
            ask(one)
            audited(one, n)
            if state(one)["state"] == "reverted":
                break
        assert state(one)["state"] == "reverted"
        wait_for(lambda: ask(two) == (SCRIPT, "finished"), timeout=1.5, interval=0.1)
    finally:
        one.stop()
        two.stop()


def test_a_restart_with_the_same_policy_file_stays_reverted_and_a_new_file_is_watched_afresh(tmp_path):
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    options = dict(policy=PolicyFile(FIRST_PROBE, CLAIMS_5), audit_fraction=1.0, config=CONFIG, state_dir=tmp_path)
    p = InProcessProxy(engine, **options)
    try:
        for n in range(1, 9):
            ask(p)
            audited(p, n)
        assert state(p)["state"] == "reverted"
    finally:
        p.stop()
    p = InProcessProxy(engine, **options)
    try:
        assert state(p)["state"] == "reverted" and ask(p) == (SCRIPT, "finished")
    finally:
        p.stop()
    p = InProcessProxy(engine, **{**options, "policy": PolicyFile({**FIRST_PROBE, "tau": 3.0}, CLAIMS_5)})
    try:
        assert ask(p)[1] == "confident" and state(p)["state"] == "serving" and state(p)["alarmed_at"] is None
    finally:
        p.stop()


def test_auto_mode_watches_then_serves_then_reverts_after_a_shift_and_resumes_after_a_restart(tmp_path):
    engine = story_engine(toy_tokenizer(), SCRIPT, lambda r: "5")  # every stop keeps the answer: a setting certifies
    options = dict(auto=True, max_risk=0.5, alpha=0.5, audit_fraction=1.0, config=CONFIG, state_dir=tmp_path)
    p = InProcessProxy(engine, **options)
    try:
        assert ask(p) == (SCRIPT, "finished") and state(p)["state"] == "watching"
        for _ in range(5):
            if state(p)["state"] == "serving":
                break
            ask(p)
        wait_for(lambda: state(p)["state"] == "serving", timeout=20)
        s = state(p)
        assert s["policy"]["method"] != "vanilla" and s["guarantee"]["certified"] and s["traces"] >= 3
    finally:
        p.stop()
    p = InProcessProxy(engine, **options)  # a restart resumes: serving, no shadow phase again
    try:
        answer, reason = ask(p)
        assert state(p)["state"] == "serving" and reason not in ("finished",) and answer != SCRIPT
        engine.answer_of = late_answer  # the traffic shifts: the served stops now change the answer
        for n in range(2, 12):
            ask(p)
            audited(p, n)
            if state(p)["state"] == "reverted":
                break
        s = state(p)
        assert s["state"] == "reverted" and s["alarmed_at"] is not None and s["policy"] is None
        assert ask(p) == (SCRIPT, "finished")
        assert httpx.get(p.url + "/health").json()["guard"]["reverted"] == ["scripted"]
    finally:
        p.stop()


def test_the_state_route_asks_for_the_key_when_one_is_set():
    engine = story_engine(toy_tokenizer(), SCRIPT, late_answer)
    p = InProcessProxy(engine, policy=PolicyFile(NEVER, CLAIMS_5), audit_fraction=1.0, config=CONFIG, proxy_api_key="k")
    try:
        assert httpx.get(p.url + "/codestop/state").status_code == 401
        ok = httpx.get(p.url + "/codestop/state", headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.json()["segments"] == []
    finally:
        p.stop()


@pytest.mark.parametrize(("options", "named"), [
    ({"auto": True, "max_risk": 0.1, "alpha": 0.05}, "state_dir"),
    ({"auto": True, "alpha": 0.05, "state_dir": "x"}, "max_risk"),
    ({"audit_fraction": 0.1}, "audit_fraction"),  # an uncalibrated policy states no risk to watch
    ({"audit_fraction": 1.5}, "audit_fraction"),
    ({"auto": True, "max_risk": 0.1, "alpha": 0.05, "state_dir": "x", "policy": PolicyFile(FIRST_PROBE, CLAIMS_5)}, "auto"),
    ({"watch_alpha": 1.0}, "watch_alpha"),
    ({"max_segments": 0}, "max_segments"),
])
def test_guard_options_are_checked_where_they_are_made(options, named):
    with pytest.raises(ParameterError, match=named):
        ServeOptions(**options)


def test_the_serve_flags_are_the_option_names():
    from codestop.cli.main import build_parser
    from codestop.cli.serve import serve_options

    args = build_parser().parse_args(["serve", "--base-url", "http://x/v1", "--auto", "--max-risk", "0.1", "--alpha", "0.05",
                                      "--state-dir", "d", "--audit-fraction", "0.2", "--watch-alpha", "0.01", "--max-segments", "4"])
    o = serve_options(args)
    assert (o.auto, o.max_risk, o.alpha, o.state_dir, o.audit_fraction, o.watch_alpha, o.max_segments) == (
        True, 0.1, 0.05, "d", 0.2, 0.01, 4)
    assert ServeOptions.from_dict(o.to_dict()) == o
