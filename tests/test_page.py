"""The page a person reads (``GET /codestop``, codestop/serve/page.py): render_page on hand-made
snapshots (each state, no audit, an alarm, hostile strings, odd values), the route and its key, and
the page in a real headless browser (Debian's chromium) in front of a real llama.cpp server, with a
screenshot kept under tests/output/."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import InProcessProxy, ask
from scripted import ScriptedEngine
from starlette.testclient import TestClient

from codestop.engines.server import ServerEngine
from codestop.policy_file import PolicyFile
from codestop.serve import ServeOptions, create_app
from codestop.serve.page import page_key_ok, render_page, snapshot_of

OUTPUT = Path(__file__).resolve().parent / "output"  # git-ignored: the browser test's screenshot


def segment(name: str = "smollm2", state: str = "serving", **over: Any) -> dict[str, Any]:
    """One segment as Guard.snapshot() gives it (the spec's example), with ``over`` replacing keys."""
    seg: dict[str, Any] = {
        "segment": name, "state": state, "traces": 1234, "policy": {"method": "codestop", "tau": 5.0},
        "guarantee": {"risk": "changed", "max_risk": 0.1, "alpha": 0.05, "n_ordering": 60, "n_testing": 140},
        "saved_cost_tokens": 4567, "audits": 40, "audits_changed": 3, "audits_failed": 1, "audit_cost_tokens": 8900,
        "changed_share": 0.075, "changed_interval": [0.01, 0.31],
        "e_values": [[1, 1.0], [2, 0.93], [40, 2.4]], "alarm_threshold": 20.0, "alarmed_at": None}
    return {**seg, **over}


def watching(name: str = "smollm2", **over: Any) -> dict[str, Any]:
    """A segment in shadow with no audit yet: no policy, no guarantee, no share, no e-value."""
    return segment(name, "watching", traces=17, policy=None, guarantee=None, saved_cost_tokens=0, audits=0,
                   audits_changed=0, audits_failed=0, audit_cost_tokens=0, changed_share=None, changed_interval=None,
                   e_values=[], alarm_threshold=20.0, **over)


class Page(HTMLParser):
    """What a page holds: each segment card's attributes, each element's text by its class, the SVGs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cards: list[dict[str, str | None]] = []
        self.text_of: dict[str, list[str]] = {}
        self.tags: list[str] = []
        self.svg_parts: list[tuple[str, dict[str, str | None]]] = []
        self._open: list[str | None] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section" and a.get("class") == "segment":
            self.cards.append(a)
        if tag in ("line", "polyline", "circle", "rect", "text"):
            self.svg_parts.append((tag, a))
        if tag not in ("meta", "line", "polyline", "circle", "rect", "br"):
            self._open.append(a.get("class"))

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("meta", "line", "polyline", "circle", "rect", "br") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for cls in self._open:
            if cls:
                self.text_of.setdefault(cls, []).append(data)

    def text(self, cls: str) -> str:
        return "".join(self.text_of.get(cls, []))


def test_each_state_shows_its_badge_traces_policy_guarantee_saving_and_audits() -> None:
    snap = {"version": "0.x", "segments": [segment("a", "watching", policy=None, guarantee=None), segment("b", "serving"),
                                             segment("c", "reverted", alarmed_at=33)]}
    page = Page(render_page(snap))
    assert [(c["data-segment"], c["data-state"]) for c in page.cards] == [("a", "watching"), ("b", "serving"), ("c", "reverted")]
    assert page.text("badge") == "watchingservingreverted"
    assert "1,234" in page.text("traces")
    assert "none (shadow: nothing stops)" in page.text("policy") and "codestop (tau=5.0)" in page.text("policy")
    assert "changed risk ≤ 0.1 with probability ≥ 0.95 for traffic like its 200 calibration traces" in page.text("guarantee")
    assert "4,567 cost tokens" in page.text("saved")
    assert "40 (3 changed; 1 failed; 8,900 cost tokens spent)" in page.text("audits")
    assert "7.5% (anytime-valid 95% interval 1.0% to 31.0%)" in page.text("changed")
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags  # self-contained, no script


def test_a_segment_without_audits_says_so_and_draws_no_chart() -> None:
    text = render_page({"version": "0.x", "segments": [watching()]})
    page = Page(text)
    assert page.cards[0]["data-state"] == "watching"
    assert page.text("changed") == "no audit yet" and page.text("e-value").startswith("no audit yet")
    assert "No e-value yet" in text and "<polyline" not in text and 'class="interval"' not in text
    assert "No segment yet" in render_page({"version": "0.x", "segments": []})


def test_the_e_value_chart_is_log_scaled_with_the_alarm_line_and_the_alarm_marked() -> None:
    e_values = [[n, 1.3 ** (n - 5)] for n in range(1, 31)]  # crosses 20 at n = 17
    page = Page(render_page({"version": "0.x", "segments": [segment("s", "reverted", e_values=e_values, alarmed_at=17)]}))
    assert "Alarm at audit 17" in page.text("alarm")
    series = [a for tag, a in page.svg_parts if tag == "polyline"][0]
    points = [tuple(map(float, p.split(","))) for p in str(series["points"]).split()]
    assert len(points) == 30
    ys = [y for _, y in points]
    steps = [ys[i] - ys[i + 1] for i in range(len(ys) - 1)]  # drawn to 0.1 px
    assert min(steps) > 0 and max(steps) - min(steps) <= 0.2  # a constant ratio is a straight line rising: a log scale
    alarm_lines = [a for tag, a in page.svg_parts if tag == "line" and a.get("class") == "alarmline"]
    horizontal = [a for a in alarm_lines if a["y1"] == a["y2"]]
    vertical = [a for a in alarm_lines if a["x1"] == a["x2"]]
    assert len(horizontal) == 1 and len(vertical) == 1
    # the alarm line sits where the series passes 20: between audit 16's 1.3**11 (17.9) and audit 17's 1.3**12 (23.3)
    assert ys[15] > float(str(horizontal[0]["y1"])) > ys[16]
    assert abs(float(str(vertical[0]["x1"])) - points[16][0]) < 0.1  # the marker at audit 17
    assert "alarm at 1/α = 20" in page.text("label alarmtext")


def test_a_long_watch_is_drawn_with_at_most_a_thousand_points_ending_at_the_last() -> None:
    e_values = [[n, 1.0 + n / 1000] for n in range(1, 5001)]
    page = Page(render_page({"segments": [segment(e_values=e_values)]}))
    series = [a for tag, a in page.svg_parts if tag == "polyline"][0]
    points = str(series["points"]).split()
    assert 900 <= len(points) <= 1001 and points[-1].startswith(f"{640 - 16:.1f},")  # the last audit at the right edge
    assert page.text("e-value") == "6; alarms at 20 (1/α)"  # 1 + 5000/1000, the last e-value


def test_every_string_from_the_snapshot_is_escaped() -> None:
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    snap = {"version": hostile, "segments": [
        segment(hostile, hostile, policy={"method": hostile, hostile: hostile}, guarantee={"risk": hostile, "max_risk": 0.1, "alpha": 0.05}),
        watching("tag&<b>")]}
    text = render_page(snap)
    page = Page(text)
    assert "script" not in page.tags and "img" not in page.tags and "b" not in page.tags
    assert [c["data-segment"] for c in page.cards] == [hostile, "tag&<b>"]  # the attribute holds the text, unbroken
    assert page.cards[0]["data-state"] == hostile
    assert hostile in page.text("name") and hostile in page.text("policy") and hostile in page.text("guarantee")
    assert "&lt;script&gt;" in text and "<script" not in text


def test_odd_values_show_as_dashes_and_never_break_the_page() -> None:
    odd = segment("odd", "serving", traces="many", saved_cost_tokens=float("nan"), audits=None, changed_share="x",
                  changed_interval=[0.1], e_values=[["a", 1], [1], "no", [2, -1.0], [3, float("inf")]],
                  alarm_threshold="20", alarmed_at=True, guarantee={"risk": "changed"}, policy="not a mapping")
    page = Page(render_page({"segments": [odd, "not a segment", 7]}))
    assert len(page.cards) == 1 and page.text("traces") == "—" and page.text("saved") == "— cost tokens"
    assert page.text("changed") == "no audit yet" and "No e-value yet" in page.text("none chart")
    assert page.text("guarantee") == "changed risk ≤ ? with probability ≥ ?"
    assert Page(render_page({"segments": "nope"})).cards == []


def test_the_page_key_is_a_basic_logins_password_with_any_user() -> None:
    def basic(login: str) -> str:
        return "Basic " + base64.b64encode(login.encode()).decode()

    assert page_key_ok(basic("viewer:k3y"), "k3y") and page_key_ok(basic(":k3y"), "k3y") and page_key_ok(basic("a:b:k3y"), "b:k3y")
    assert page_key_ok(" basic " + basic("x:k3y").split()[1], "k3y")  # the scheme in any case
    assert not page_key_ok(basic("k3y:"), "k3y") and not page_key_ok(basic("x:k3"), "k3y")
    assert not page_key_ok("Bearer k3y", "k3y") and not page_key_ok("Basic !!!", "k3y") and not page_key_ok(basic("x:"), "")


def test_the_route_asks_for_the_key_as_bearer_or_a_basic_login_never_in_the_query(toy_tokenizer, tmp_path) -> None:
    key = "page-s3cret-key"
    app = create_app(ScriptedEngine(toy_tokenizer, "Step. "), ServeOptions(proxy_api_key=key, shadow=tmp_path / "shadow.jsonl"))
    with TestClient(app) as client:
        for headers, params in (({}, {}), ({}, {"key": key}), ({"authorization": "Bearer wrong"}, {}),
                                ({"authorization": "Basic " + base64.b64encode(b"viewer:wrong").decode()}, {})):
            r = client.get("/codestop", headers=headers, params=params)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic realm=")  # a browser asks
            assert r.json()["error"]["code"] == "invalid_api_key" and key not in r.text
        for auth in (f"Bearer {key}", "Basic " + base64.b64encode(f"viewer:{key}".encode()).decode()):
            r = client.get("/codestop", headers={"authorization": auth})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert key not in r.text  # the page never holds the key
            assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"
            assert "default-src 'none'" in r.headers["content-security-policy"]
            page = Page(r.text)
            assert [(c["data-segment"], c["data-state"]) for c in page.cards] == [(app.state.served.engine.model_name, "watching")]


def test_without_a_guard_the_snapshot_comes_from_the_options_and_with_one_from_it(toy_tokenizer, tmp_path) -> None:
    guarantee = {"risk": "changed", "max_risk": 0.05, "alpha": 0.1, "n_ordering": 10, "n_testing": 30}
    policy = PolicyFile({"method": "codestop", "tau": 6.0}, guarantee)
    app = create_app(ScriptedEngine(toy_tokenizer, "Step. "), ServeOptions(policy=policy, served_model_name=["m1", "m2"]))
    with TestClient(app) as client:
        page = Page(client.get("/codestop").text)  # no key: open, as /metrics is
    assert [(c["data-segment"], c["data-state"]) for c in page.cards] == [("m1", "serving"), ("m2", "serving")]
    assert "changed risk ≤ 0.05 with probability ≥ 0.9 for traffic like its 40 calibration traces" in page.text("guarantee")
    assert page.text("changed") == "no audit yet" * 2 and "alarms at 10" in page.text("e-value")

    class Guarded:  # what the guard branch gives Served: a snapshot of its own
        guard = type("Guard", (), {"snapshot": staticmethod(lambda: {"version": "g", "segments": [segment("tagged", "reverted")]})})()

    assert snapshot_of(Guarded())["segments"][0]["segment"] == "tagged"


# --------------------------------------------------------------------------------------------
# In a real headless browser, in front of a real llama.cpp server
# --------------------------------------------------------------------------------------------

def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("no chromium: apt-get install -y chromium (Debian's package; .ci/run installs it)")
    return found


def browse(url: str, profile: Path, *args: str, size: str = "1280,1000") -> subprocess.CompletedProcess[str]:
    """Debian's chromium, headless, on ``url``: what ``args`` ask for (--dump-dom, --screenshot=...)."""
    command = [chromium(), "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={size}", *args, url]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # chromium refuses root with its sandbox (CI containers run as root)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow
def test_the_page_in_a_headless_browser_shows_the_segment_and_its_state(llama, tmp_path) -> None:
    key = "page-browser-key"
    engine = ServerEngine.connect(llama.url + "/v1", backoff=0.05)
    p = InProcessProxy(engine, proxy_api_key=key, shadow=tmp_path / "shadow.jsonl", served_model_name="smollm2-page")
    try:
        assert ask(p.client(api_key=key), "What is 2 + 2?", max_tokens=24, temperature=0).choices[0].message.content is not None
        address = f"127.0.0.1:{p.port}/codestop"
        refused = browse(f"http://{address}", tmp_path / "profile", "--dump-dom").stdout
        assert Page(refused).cards == [] and "smollm2-page" not in refused  # no key, no page (the login asked for, unanswered)
        dom = browse(f"http://viewer:{key}@{address}", tmp_path / "profile", "--dump-dom").stdout  # a Basic login
        page = Page(dom)
        assert [(c["data-segment"], c["data-state"]) for c in page.cards] == [("smollm2-page", "watching")]
        assert page.text("badge") == "watching" and page.text("traces") == "1"
        assert page.text("policy") == "none (shadow: nothing stops)" and page.text("changed") == "no audit yet"
        assert key not in dom
        OUTPUT.mkdir(exist_ok=True)
        shot = OUTPUT / "codestop-page.png"
        shot.unlink(missing_ok=True)
        browse(f"http://viewer:{key}@{address}", tmp_path / "profile", f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
        print(f"the page's screenshot: {shot}")
        # a guard's snapshot (what Served.guard gives: every state, audits, an alarm) through the same route
        snapshot = {"version": "0.x", "segments": [
            segment("smollm2-page/a", "serving"),
            segment("smollm2-page/math", "reverted", e_values=[[n, 1.25 ** (n - 8)] for n in range(1, 26)], alarmed_at=22)]}
        p.app.state.served.guard = type("Guard", (), {"snapshot": staticmethod(lambda: snapshot)})()
        page = Page(browse(f"http://viewer:{key}@{address}", tmp_path / "profile", "--dump-dom").stdout)
        assert [c["data-state"] for c in page.cards] == ["serving", "reverted"] and "Alarm at audit 22" in page.text("alarm")
        assert len([a for tag, a in page.svg_parts if tag == "polyline"]) == 2
        shot = OUTPUT / "codestop-page-guard.png"
        shot.unlink(missing_ok=True)
        browse(f"http://viewer:{key}@{address}", tmp_path / "profile", f"--screenshot={shot}", size="1400,1300")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"with a guard's snapshot: {shot}")
        assert re.search(r'codestop_shadow_requests_total 1\.0', httpx.get(p.url + "/metrics", headers={"authorization": f"Bearer {key}"}).text)
    finally:
        p.stop()
