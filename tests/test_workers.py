"""``codestop serve --workers 2`` as the real verb in its own process, in front of a REAL vLLM server
(SmolLM2-135M-Instruct; the ``vllm_url`` fixture): both workers answer requests, each on its own
upstream connections, and ``/metrics`` sums the workers' series whichever worker is scraped; a
worker killed mid-request leaves no request in flight behind it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
import pytest
from harness import free_port, scrape

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0,
        "codestop": {"method": "vanilla"}}


@pytest.fixture(scope="module")
def two_workers(vllm_url):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "codestop.cli", "serve", "--base-url", vllm_url, "--port", str(port),
                             "--workers", "2", "--log-level", "warning"], cwd=REPO, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"codestop serve --workers 2 exited with {proc.returncode}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "codestop serve --workers 2 did not become healthy in 120 s"
            time.sleep(0.5)
        yield proc, url, urlparse(vllm_url).port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def upstream_users(proc: subprocess.Popen[bytes], upstream_port: int) -> set[int]:
    """The processes under the server that hold a connection to the upstream (each worker keeps its
    own client's connections open between requests)."""
    users = set()
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any(c.raddr and c.raddr.port == upstream_port for c in p.net_connections(kind="tcp")):
                users.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return users


def test_two_workers_both_answer_and_metrics_sum_them(two_workers):
    proc, url, upstream_port = two_workers
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        # the kernel hands each new connection to one worker: rounds of 8 concurrent clients until both have
        for _ in range(6):
            answers = list(pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=120), range(8)))
            sent += len(answers)
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
            assert all(r.json()["choices"][0]["message"]["content"] for r in answers)
            if len(upstream_users(proc, upstream_port)) == 2:
                break
        assert upstream_users(proc, upstream_port) == {p.pid for p in workers}
    # every scrape, whichever worker answers it, counts every worker's requests
    for _ in range(6):
        assert scrape(url, "codestop_requests_total", endpoint="chat", status="200") == sent
        assert scrape(url, "codestop_upstream_requests_total", kind="step") >= sent  # the engines' own counters, summed
        assert scrape(url, "codestop_requests_in_flight") == 0


def workers_of(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn" in " ".join(p.cmdline())]


def test_a_worker_killed_mid_request_leaves_no_request_in_flight(two_workers):
    """kill -9 the worker answering a stream: uvicorn starts another, and the dead worker's request
    stops counting in ``codestop_requests_in_flight`` (its live gauge removed, prometheus_client's
    ``mark_process_dead``). Before, the gauge read 1.0 for good."""
    proc, url, _ = two_workers
    port = int(url.rsplit(":", 1)[1])
    long = {**CHAT, "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
            "max_tokens": 1500, "stream": True}
    body = json.dumps(long).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert client.recv(12) == b"HTTP/1.1 200"  # the stream has started: the request is in flight
        mine = client.getsockname()[1]

        def holds_it(p: psutil.Process) -> bool:
            return any(c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == mine for c in p.net_connections("tcp"))

        (answering,) = [p for p in workers_of(proc) if holds_it(p)]
        assert scrape(url, "codestop_requests_in_flight") == 1
        answering.kill()
        answering.wait(30)
    deadline, left = time.monotonic() + 30, 1.0
    while time.monotonic() < deadline and (left := scrape(url, "codestop_requests_in_flight")) != 0:
        time.sleep(0.2)
    assert left == 0, "the dead worker's request still counts as in flight"
    deadline = time.monotonic() + 120
    while len(workers_of(proc)) != 2 or httpx.get(url + "/health", timeout=10).status_code != 200:  # uvicorn replaced it
        assert time.monotonic() < deadline, [p.cmdline() for p in workers_of(proc)]
        time.sleep(0.5)
    assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=120).status_code == 200
