"""No leaked upstream connection, whatever ends a request (issue 26): 50 requests in a row
through a DEFAULT proxy (overlapped probing, CoDE-Stop) in front of a REAL llama.cpp server and a
REAL vLLM, each ended a different way: the token budget reached while the reasoning streams on
ahead, an early stop at the first probe, a streaming client that leaves after its first chunk, a
plain request the client gives up on, a request refused before it reaches the upstream. Then no
connection of the proxy's pools is checked out and every socket of the proxy to the upstream is an
idle one a pool holds: none lost outside them in CLOSE-WAIT. Before the fix each stop of the
streaming reader left one, and the proxy answered 504 for good after ~70 requests; the socket count
finds a single one, so ten of each ending are enough (150 took 158 s of the suite for no more checks).

The proxy runs in this process (``InProcessProxy``), so the sockets checked are this process's to
the upstream's port (the clients talk to the proxy's port) opened during the test. The upstreams
are the session's, shared: an engine an earlier test drove with ``asyncio.run`` keeps the client of
each finished loop (it cannot be closed once its loop is), and its sockets sit in CLOSE-WAIT until
that client is garbage-collected (12 of them failed this test once it ran after most modules)."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import psutil
import pytest
from harness import InProcessProxy

from codestop.engines.server import ServerEngine

pytestmark = pytest.mark.slow
N_REQUESTS = 50
SAY_HI = [{"role": "user", "content": "Say hi."}]
POEM = [{"role": "user", "content": "Write a short poem about the sea, four lines."}]
# confident at its first probe (after 4 tokens, at a line end): an early stop every time one comes
FIRST_PROBE = {"method": "codestop", "r_min": 0.0, "r_max": 0.0, "probe_interval": 4, "boundaries": ["\n", " "]}


def sockets_to(port: int) -> list:
    """This process's TCP sockets to ``port``."""
    return [c for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port]


def upstream_sockets(port: int, before: frozenset[tuple] = frozenset()) -> Counter[str]:
    """This process's TCP sockets to ``port``, by state, leaving out those open ``before`` (the
    upstreams are the session's, shared: an earlier test's idle client may still hold one)."""
    return Counter(c.status for c in sockets_to(port) if tuple(c.laddr) not in before)


def open_sockets(port: int) -> frozenset[tuple]:
    return frozenset(tuple(c.laddr) for c in sockets_to(port))


def run_mixed(proxy: InProcessProxy, n: int) -> Counter[str]:
    """``n`` requests in a row, each ended one of five ways; what happened, by kind and outcome."""
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=proxy.url, timeout=120) as client:
        for i in range(n):
            kind = ("budget", "early_stop", "client_leaves_stream", "client_gives_up", "refused")[i % 5]
            if kind == "budget":  # the reasoning stream runs ahead: the budget ends it, the reader is stopped
                r = client.post("/v1/chat/completions", json={"messages": SAY_HI, "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                seen[f"{kind}:{r.json()['usage']['codestop']['stop_reason']}"] += 1
            elif kind == "early_stop":
                r = client.post("/v1/chat/completions", json={"messages": POEM, "max_tokens": 24, "temperature": 0,
                                                              "codestop": FIRST_PROBE})
                assert r.status_code == 200, r.text
                seen[f"{kind}:{r.json()['usage']['codestop']['stopped_early']}"] += 1
            elif kind == "client_leaves_stream":
                body = {"messages": POEM, "max_tokens": 48, "stream": True}
                with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    assert next(line for line in r.iter_lines() if line.startswith("data: "))
                seen[kind] += 1  # closed after its first chunk
            elif kind == "client_gives_up":
                try:  # a plain request abandoned mid-generation: the proxy sees the client gone
                    client.post("/v1/chat/completions", json={"messages": POEM, "max_tokens": 64}, timeout=0.3)
                    seen[f"{kind}:finished"] += 1
                except httpx.TimeoutException:
                    seen[f"{kind}:left"] += 1
            else:  # an error: a bad value, refused with a 400 before any upstream request
                r = client.post("/v1/chat/completions", json={"messages": SAY_HI, "max_tokens": 8, "temperature": -1})
                assert r.status_code == 400, r.text
                seen[kind] += 1
    return seen


def check_no_leak(proxy: InProcessProxy, engine: ServerEngine, upstream_port: int, before: frozenset[tuple]) -> None:
    """Every connection back in a pool (or closed) once the proxy is idle, no socket outside the
    pools, and /metrics and /health say so; the proxy still answers."""
    deadline = time.monotonic() + 30  # a client that left: its request ends once the proxy reads its disconnect
    while True:
        in_use, sockets = engine.connections()["in_use"], upstream_sockets(upstream_port, before)
        if in_use == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    pools = engine.connections()
    assert in_use == 0, (pools, sockets)
    # every socket to the upstream is one the pools hold (kept alive for the next request), none
    # is lost outside them; one in CLOSE-WAIT is an idle one the server hung up on, closed on reuse
    assert sum(sockets.values()) == pools["idle"] and sockets["CLOSE_WAIT"] <= pools["idle"], (pools, sockets)
    assert 'codestop_upstream_connections{state="in_use"} 0.0' in proxy.metrics()
    health = httpx.get(proxy.url + "/health").json()
    assert health["upstream_connections"]["in_use"] == 0, health
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": SAY_HI, "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text


def check_mix(seen: Counter[str], n: int) -> None:
    """Every kind ran; early stops happened (CoDE-Stop stops at its first probe when one comes)."""
    assert sum(seen.values()) == n
    assert seen["refused"] == seen["client_leaves_stream"] == n // 5, seen
    assert seen["early_stop:True"] >= 1 and seen["client_gives_up:left"] >= 1, seen
    assert seen["budget:max_tokens"] + seen["budget:finished"] == n // 5, seen


def test_llamacpp_requests_ended_every_way_leave_no_connection_checked_out(llama):
    check_requests_ended_every_way(llama.url + "/v1")


def test_vllm_requests_ended_every_way_leave_no_connection_checked_out(vllm_url):
    check_requests_ended_every_way(vllm_url)


def check_requests_ended_every_way(url: str) -> None:
    port = httpx.URL(url).port
    before = open_sockets(port)
    engine = ServerEngine.connect(url, backoff=0.05)
    proxy = InProcessProxy(engine)  # the defaults: overlapped probing, CoDE-Stop
    try:
        seen = run_mixed(proxy, N_REQUESTS)
        check_mix(seen, N_REQUESTS)
        check_no_leak(proxy, engine, port, before)
    finally:
        proxy.stop()
