"""What the proxy answers when its upstream refuses a request: one mapping (the transport's) for
every path, the reasoning's completions and the agents' chat alike. A key the upstream refuses
(401, 403) is the operator's error, which no client can fix: a 502 ``upstream_unauthorized``
saying so, not ``upstream_unavailable`` (the upstream is up). A request the upstream calls
malformed (400, 422) is the client's: a 400 ``upstream_rejected`` in the upstream's words.

Against a real llama.cpp server (SmolLM2) demanding an API key; the refused key is the operator
rotating the upstream's key while the proxy runs (llama-server refuses a wrong key on every route,
``/v1/models`` included, so a proxy never starts with one)."""

from __future__ import annotations

import httpx
import pytest
from harness import InProcessProxy
from llama_servers import LlamaServer

from codestop.engines.server import ServerEngine

KEY, ROTATED = "codestop-test-key-1", "codestop-test-key-2"
ASK = [{"role": "user", "content": "Say hi."}]
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}


@pytest.fixture(scope="module")
def keyed(smollm2_path):
    """A llama.cpp server that demands ``KEY``, and a proxy that sends it."""
    server = LlamaServer(smollm2_path, slots=1, api_key=KEY).start()
    proxy = InProcessProxy(ServerEngine.connect(server.url + "/v1", api_key=KEY, backoff=0.05))
    yield server, proxy
    proxy.stop()
    server.kill()


def post(proxy: InProcessProxy, path: str, body: dict) -> httpx.Response:
    return httpx.post(proxy.url + path, json={"max_tokens": 4, "temperature": 0, **body}, timeout=120)


def test_an_upstream_400_is_the_clients_error_in_the_upstreams_words(keyed):
    _, proxy = keyed
    assert post(proxy, "/v1/chat/completions", {"messages": ASK}).status_code == 200  # the key works
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 7}}}
    r = post(proxy, "/v1/chat/completions", {"messages": ASK, "response_format": bad_schema})
    error = r.json()["error"]
    assert (r.status_code, error["type"], error["code"]) == (400, "invalid_request_error", "upstream_rejected"), r.text
    assert "refused the request: it answered 400" in error["message"], r.text


def test_a_refused_key_is_the_operators_502_on_every_path(keyed):
    server, proxy = keyed
    server.kill()
    server.api_key = ROTATED  # the operator rotated the upstream's key; the proxy still sends the old one
    server.start()
    cases = {
        "chat": ("/v1/chat/completions", {"messages": ASK}),
        "streamed chat": ("/v1/chat/completions", {"messages": ASK, "stream": True}),
        "completion": ("/v1/completions", {"prompt": "Hello"}),
        "agent's chat": ("/v1/chat/completions", {"messages": ASK, "response_format": PERSON}),
        "agent's streamed chat": ("/v1/chat/completions", {"messages": ASK, "response_format": PERSON, "stream": True}),
    }
    for what, (path, body) in cases.items():
        r = post(proxy, path, body)
        error = r.json()["error"]
        assert (r.status_code, error["type"], error["code"]) == (502, "upstream_error", "upstream_unauthorized"), (what, r.text)
        assert "refused the proxy's credentials (401" in error["message"] and "--api-key" in error["message"], (what, r.text)
        assert KEY not in r.text and ROTATED not in r.text, (what, r.text)
