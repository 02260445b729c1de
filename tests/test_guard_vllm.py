"""The guard in front of a REAL vLLM (SmolLM2-135M-Instruct, the shared ``vllm_url``): a bad setting
alarms and the proxy then answers as the upstream alone; a setting that never stops is audited and
never alarms; auto mode watches, serves, reverts after a shift, and resumes after a restart.

vLLM's CPU build is not batch-invariant (tests/test_overlap.py's docstring): a request's greedy
tokens can change with what shares its batch. So the byte-for-byte comparison with the upstream's
own answers is made one request at a time, once no audit runs in the background, and those
requests ask for no boundary probe (``probe_interval`` past their cap: a shadowed answer is then one
stream alone, its reference probe taken after it ends), so nothing shares the stream's batch."""

from __future__ import annotations

import httpx
import pytest
from harness import ARITHMETIC, InProcessProxy, wait_for

from codestop.engines.server import ServerEngine
from codestop.policy_file import PolicyFile
from codestop.serve.defaults import DEFAULT_CONFIG

pytestmark = pytest.mark.slow

QUESTIONS = ARITHMETIC
MAX_TOKENS = 48
CONFIG = DEFAULT_CONFIG.replace(probe_interval=8, boundaries=(" ",))  # a probe at a word, 8 tokens apart at least: every answer probes
FIRST_PROBE = {"method": "codestop", "r_min": 0.0, "r_max": 0.0}  # stops at its first probe
NEVER = {"method": "codestop", "r_min": 1.0, "r_max": 1.0, "tau": 1000.0}  # never confident enough to stop
CLAIMS_5 = {"risk": "changed", "max_risk": 0.05, "alpha": 0.05}
ALARM_WITHIN = 6  # requests (each audited): the bad setting alarms within them (3 at the least: the first audit bets nothing)
NO_PROBES = {"probe_interval": 100000}  # a request's own knob: no boundary probe beside its stream


def proxy(url: str, **options) -> InProcessProxy:
    return InProcessProxy(ServerEngine.connect(url, backoff=0.05), config=CONFIG, **options)


def ask(p: InProcessProxy, question: str, max_tokens: int = MAX_TOKENS, **codestop) -> dict:
    body = {"model": p.model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(p.url + "/v1/chat/completions", json={**body, **({"codestop": codestop} if codestop else {})}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def direct(url: str, model: str, question: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": MAX_TOKENS}
    return httpx.post(url + "/chat/completions", json=body, timeout=300).json()


def segment(p: InProcessProxy) -> dict:
    segments = httpx.get(p.url + "/codestop/state").json()["segments"]
    return next(s for s in segments if s["segment"] == p.model)


def audited(p: InProcessProxy, n: int) -> None:
    """Wait until ``n`` audits are in (or the segment no longer serves)."""
    wait_for(lambda: (s := segment(p))["audits"] + s["audits_failed"] >= n or s["state"] != "serving", timeout=120, interval=0.1)


def quiet(p: InProcessProxy) -> None:
    """Wait until no audit or calibration runs in the background."""
    guard = p.app.state.served.guard
    wait_for(lambda: not guard.busy, timeout=120, interval=0.1)


def test_a_bad_setting_alarms_within_6_requests_and_then_the_answers_are_the_upstreams_own(vllm_url):
    p = proxy(vllm_url, policy=PolicyFile(FIRST_PROBE, CLAIMS_5), audit_fraction=1.0)
    try:
        for n in range(1, ALARM_WITHIN + 1):
            usage = ask(p, QUESTIONS[(n - 1) % len(QUESTIONS)])["usage"]["codestop"]
            assert usage["stopped_early"] and usage["probe_count"] == 1  # the bad setting, served
            audited(p, n)
            if segment(p)["state"] == "reverted":
                break
        s = segment(p)
        assert s["state"] == "reverted" and s["alarmed_at"] == n <= ALARM_WITHIN and s["audits_failed"] == 0
        assert s["e_values"][-1][1] >= s["alarm_threshold"] and s["changed_interval"][0] > CLAIMS_5["max_risk"]
        assert httpx.get(p.url + "/health").json()["guard"]["reverted"] == [p.model]
        quiet(p)
        print(f"the bad setting alarmed after {n} requests")
        for question in QUESTIONS[:2]:  # one at a time, nothing beside them
            mine, theirs = ask(p, question, **NO_PROBES), direct(vllm_url, p.model, question)
            assert mine["usage"]["codestop"]["stop_reason"] in ("finished", "max_tokens")
            assert mine["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
            assert mine["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
        assert segment(p)["traces"] >= n + 2  # the audits' traces and the reverted requests' are all recorded
    finally:
        p.stop()


def test_a_setting_that_never_stops_is_audited_and_never_alarms(vllm_url):
    p = proxy(vllm_url, policy=PolicyFile(NEVER, CLAIMS_5), audit_fraction=1.0)
    try:
        for n, question in enumerate(QUESTIONS[:4], 1):
            assert not ask(p, question)["usage"]["codestop"]["stopped_early"]
            audited(p, n)
        s = segment(p)
        assert (s["state"], s["audits"], s["audits_changed"], s["audit_cost_tokens"], s["alarmed_at"]) == ("serving", 4, 0, 0, None)
    finally:
        p.stop()


# auto mode's traffic, as SmolLM2 answers it (greedy): before the shift every probe answers "6" as the
# full reasoning does, at a confidence near 0.5, so a setting that stops at the first probe is certified;
# after it, the first probe answers "42 42 42 ..." at a confidence near 0.9 and the full reasoning "42"
SAME = "What is 6 times 7? Write the answer first, then explain it."
SHIFTED = "Repeat after me: " + " ".join(["42"] * 20)
AUTO_MAX_TOKENS = 64


def test_auto_mode_watches_serves_reverts_after_a_shift_and_resumes_after_a_restart(vllm_url, tmp_path):
    # max_risk and alpha large enough that a few traces can certify: the first calibration (3 traces,
    # attempt 1 at alpha 0.30) when no trace changed, the second (6 traces, at 0.076) when one did.
    # One may: shadow's probes run beside the stream, and vLLM's CPU build is not batch-invariant
    # (seen once in CI, on a fresh server: still watching after 6 requests at max_risk 0.5)
    options = dict(auto=True, max_risk=0.7, alpha=0.5, audit_fraction=1.0, state_dir=tmp_path)
    p = proxy(vllm_url, **options)
    try:
        assert not ask(p, SAME, AUTO_MAX_TOKENS)["usage"]["codestop"]["stopped_early"] and segment(p)["state"] == "watching"
        for _ in range(5):
            quiet(p)
            if segment(p)["state"] == "serving":
                break
            ask(p, SAME, AUTO_MAX_TOKENS)
        s = segment(p)
        assert s["state"] == "serving" and s["guarantee"]["certified"] and s["policy"]["method"] != "vanilla", s
        print(f"auto mode serves {s['policy']} after {s['traces']} traces")
    finally:
        p.stop()
    p = proxy(vllm_url, **options)  # a restart resumes: serving at once
    try:
        assert segment(p)["state"] == "serving"
        for n in range(1, 9):
            ask(p, SHIFTED, AUTO_MAX_TOKENS)
            audited(p, n)
            if segment(p)["state"] == "reverted":
                break
        s = segment(p)
        assert s["state"] == "reverted" and s["alarmed_at"] is not None and s["policy"] is None, s
        print(f"auto mode reverted after {n} shifted requests")
        assert not ask(p, SAME, AUTO_MAX_TOKENS)["usage"]["codestop"]["stopped_early"]  # shadow again
    finally:
        p.stop()


def test_workers_share_one_watch_and_a_revert_reaches_every_worker_within_a_second(vllm_url, tmp_path):
    """The real verb with ``--workers 2`` over one state dir: the audits of both workers feed one
    watch, and once it alarms every request, whichever worker takes it, is answered unstopped."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from harness import free_port

    repo = Path(__file__).resolve().parents[1]
    policy = tmp_path / "bad.json"
    policy.write_text(json.dumps(PolicyFile(FIRST_PROBE, CLAIMS_5).to_json()))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-m", "codestop.cli", "serve", "--base-url", vllm_url, "--port", str(port),
                             "--workers", "2", "--log-level", "warning", "--policy-file", str(policy), "--audit-fraction", "1",
                             "--state-dir", str(tmp_path / "state"), "--probe-interval", "8", "--boundaries", " "],
                            cwd=repo, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url, proc), timeout=120, interval=0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        def state() -> dict:
            return next(s for s in httpx.get(url + "/codestop/state").json()["segments"] if s["segment"] == model)

        def chat(question: str, **codestop) -> dict:
            body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": MAX_TOKENS}
            return httpx.post(url + "/v1/chat/completions", json={**body, **({"codestop": codestop} if codestop else {})},
                              timeout=300).json()

        for n in range(1, ALARM_WITHIN + 1):
            chat(QUESTIONS[(n - 1) % len(QUESTIONS)])
            wait_for(lambda n=n: (s := state())["audits"] + s["audits_failed"] >= n or s["state"] != "serving", timeout=120, interval=0.2)
            if state()["state"] == "reverted":
                break
        assert state()["state"] == "reverted"
        time.sleep(1)
        for question in QUESTIONS[:4]:  # new connections: the kernel spreads them over both workers
            assert not chat(question, **NO_PROBES)["usage"]["codestop"]["stopped_early"]
        metrics = httpx.get(url + "/metrics").text
        assert f'codestop_guard_state{{segment="{model}",state="reverted"}} 1.0' in metrics
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def healthy(url: str, proc) -> bool:
    assert proc.poll() is None, f"codestop serve --workers 2 exited with {proc.returncode}"
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
