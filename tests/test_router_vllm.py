"""codestop behind a real router: ``vllm-router --policy consistent_hash`` (PyPI's prebuilt binary)
in front of two real vLLM CPU replicas (the session's ``vllm_url`` and one of this module's), and
``codestop serve`` in front of the router. With ``--router vllm-router`` every upstream request of
one question (the reasoning stream, each probe, the answer) lands on one replica, and its probes
hit that replica's prefix cache; with the key off the same kind of questions scatter over both
(the router then hashes each request's own body), measured here, so the key is what holds them.

Each replica's requests are counted from its own /metrics (``vllm:time_to_first_token_seconds``:
one observation per request that started generating, a stream cut short by the proxy included;
``vllm:prefix_cache_queries_total``: the prompt tokens it was asked to prefill). The session's
vLLM serves only this module while it runs (pytest runs one test at a time), so its counters are
read as deltas. Small on purpose: two questions keyed and three plain, 48 tokens each (vLLM's CPU build caches whole
blocks of 128 tokens, so each question's prompt is over 128 tokens: its probes can hit the cache)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import pytest
from harness import InProcessProxy, binary, metric
from vllm_server import VllmServer, model_dir, vllm_python

from codestop.engines.server import ServerEngine
from codestop.engines.server.launch import ServerProcess, free_port

pytestmark = pytest.mark.slow

# CoDE-Stop probing every 4 tokens at a space, set so it never stops (test_serve_vllm.py's): about
# 8 probes beside the stream, then the answer phase
NEVER = {"family": "think", "probe_interval": 4, "boundaries": [" "], "variant": "reference", "r_min": 1, "r_max": 1, "tau": 1000}
MAX_TOKENS = 48
BLOCK = 128  # vLLM's CPU build caches whole blocks of 128 tokens


def question(tag: str) -> list[dict]:
    # the tag first, so no two questions share a cached block; over 128 tokens of prompt
    numbers = ", ".join(str(i) for i in range(100, 160))
    return [{"role": "user", "content": f"Question {tag}. Here are some numbers: {numbers}. What is the sum of the first two?"}]


@pytest.fixture(scope="module")
def replicas(vllm_url):
    """The roots of two vLLM replicas: the session's, and one started here (stopped at the module's
    end), or the one ``$CODESTOP_VLLM_REPLICA_URL`` names."""
    given = os.environ.get("CODESTOP_VLLM_REPLICA_URL")
    if given:
        yield [vllm_url.removesuffix("/v1"), given.rstrip("/").removesuffix("/v1")]
        return
    python = vllm_python()
    assert python is not None, "vllm_url started or found a vLLM, so its python is known"
    second = VllmServer(python, model_dir(), kv_cache_gib=1)
    second.start()
    try:
        yield [vllm_url.removesuffix("/v1"), second.url.removesuffix("/v1")]
    finally:
        second.stop()


@pytest.fixture(scope="module")
def router(replicas):
    """vllm-router with consistent hashing in front of both replicas: its root URL."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="codestop-vllm-router-", suffix=".log")[1])
    process = ServerProcess([binary("vllm-router"), "--host", "127.0.0.1", "--port", str(port), "--policy", "consistent_hash",
                             "--worker-urls", *replicas, "--worker-startup-check-interval", "1", "--log-level", "warning"],
                            port, log, name="vllm-router")
    process.start(60)
    yield f"http://127.0.0.1:{port}"
    process.stop()


def counts(replica: str) -> tuple[float, float, float]:
    """A replica's (requests, prompt tokens queried in its prefix cache, of them hits) so far."""
    text = httpx.get(replica + "/metrics", timeout=10).text
    return (metric(text, "vllm:time_to_first_token_seconds_count"), metric(text, "vllm:prefix_cache_queries_total"),
            metric(text, "vllm:prefix_cache_hits_total"))


def ask_each(proxy: InProcessProxy, replicas: list[str], tags: list[str]) -> list[tuple[list[tuple[float, ...]], int]]:
    """Ask each question once; per question, what each replica counted for it (deltas), and its prompt's tokens."""
    out = []
    for tag in tags:
        before = [counts(r) for r in replicas]
        r = httpx.post(proxy.url + "/v1/chat/completions", timeout=300, json={
            "messages": question(tag), "max_tokens": MAX_TOKENS, "temperature": 0, "codestop": NEVER})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["codestop"]["probe_count"] >= 2, usage  # greedy SmolLM2 may end its thinking early
        after = [counts(r) for r in replicas]
        out.append(([tuple(a - b for a, b in zip(x, y)) for x, y in zip(after, before)], usage["prompt_tokens"]))
    return out


def test_every_request_of_a_question_stays_on_one_replica_and_its_probes_hit_the_cache(router, replicas):
    keyed = InProcessProxy(ServerEngine.connect(router + "/v1", backoff=0.05), router="vllm-router")
    plain = InProcessProxy(ServerEngine.connect(router + "/v1", backoff=0.05))
    try:
        sent = keyed.app.state.served.engine.transport.stats.by_kind
        for i, (seen, prompt_tokens) in enumerate(ask_each(keyed, replicas, ["k1", "k2"])):
            used = sorted(n for n, _, _ in seen)
            assert used[0] == 0 and used[1] >= 4, f"question {i}: requests per replica {used}"
            # every request after the question's first found at least the prompt's whole blocks in the cache
            requests, queried, hits = max(seen)
            cached = BLOCK * (prompt_tokens // BLOCK) * (requests - 1)
            assert hits >= cached > 0, f"question {i}: {hits:.0f} of {queried:.0f} prompt tokens from the cache, {requests:.0f} requests"
        assert sent.get("probe", 0) >= 4, sent
        # the key off: the router hashes each request alone, and a question's requests scatter. This
        # router keys a token-id prompt by its length ("request:token_ids:371" in its log), so where
        # they go follows where the probes fall; with two questions of one length (the same lengths,
        # so the same replicas) every request of both once landed on one replica (CI, 2026-12-07).
        # Three questions of different lengths: each has its own lengths, so a split shows in one.
        tags = ["p1", "p2 " + "and two more words " * 2, "p3 " + "and two more words " * 5]
        split = [sorted(n for n, _, _ in seen) for seen, _ in ask_each(plain, replicas, tags)]
        assert any(used[0] > 0 for used in split), f"without the key, requests per replica per question: {split}"
    finally:
        keyed.stop()
        plain.stop()
