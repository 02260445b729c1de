"""``codestop serve --workers 2`` as the real verb in its own process, in front of a REAL vLLM server
(SmolLM2-135M-Instruct; the ``vllm_url`` fixture): both workers answer requests, each on its own
upstream connections, and ``/metrics`` sums the workers' series whichever worker is scraped."""

from __future__ import annotations

import os
import signal
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
