"""Bad input to ``codestop serve`` and to the server engine: each refused with the right status and
OpenAI's error shape, nothing leaked, the connection left usable. A scripted in-process engine
(the tests' toy tokenizer and its ChatML template) or a fake upstream (``httpx.MockTransport``, a socket that
never answers) stands behind the proxy: nothing depends on what a model writes.

The request validation itself (the typed request models, then the values checked where they are
defined) is one table at the end, called directly; a few cases go through the proxy to show the
wiring: the 400's shape, the param named, the connection still usable."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import threading

import httpx
import pytest
from harness import InProcessProxy, free_port, serve_in_thread, wait_for
from scripted import ScriptedEngine

import codestop
from codestop.cli.serve import add_parser, build_engine, engine_spec
from codestop.engines.server import ServerEngine, error_message
from codestop.errors import CodestopError, ServerTimeout, redact
from codestop.policies import make_policy
from codestop.serve import ServeOptions, create_app
from codestop.serve.app import json_depth
from codestop.serve.defaults import DEFAULT_CONFIG
from codestop.serve.protocol import ROLES, error_for, parse_request
from codestop.serve.serving import Prepared, prepare, server_defaults

KEY = "s3cret-proxy-key"
CHAT = {"messages": [{"role": "user", "content": "Go."}], "max_tokens": 3}


def error_of(r: httpx.Response, status: int, param: str | None, code: str | None = None,
             kind: str = "invalid_request_error") -> str:
    """The message of an error response that has ``status`` and exactly OpenAI's shape."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message", "param", "type"], body
    assert (body["error"]["type"], body["error"]["param"], body["error"]["code"]) == (kind, param, code), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


DEFAULTS = server_defaults(DEFAULT_CONFIG, {"method": "codestop"}, None)


def prepared(engine, body: dict, chat: bool = True) -> Prepared:
    """A request body through the proxy's validation, as a request would go: its model, then its values."""
    return asyncio.run(prepare(parse_request(body, chat), engine, DEFAULTS))


def refusal(engine, body: dict, chat: bool = True) -> tuple[int, dict]:
    """The status and OpenAI-style body the proxy answers a request it refuses."""
    try:
        prepared(engine, body, chat)
    except Exception as exc:  # noqa: BLE001 - what the app's error handler gets
        return error_for(exc, "messages" if chat else "prompt")
    raise AssertionError(f"accepted: {body}")


@pytest.fixture(scope="module")
def scripted(toy_tokenizer):
    return ScriptedEngine(toy_tokenizer, "Step. " * 20, window=2048)


@pytest.fixture(scope="module")
def proxy(scripted):
    p = InProcessProxy(scripted, policy={"method": "vanilla"}, close_engine=False, max_request_bytes=16384)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def keyed(scripted):
    p = InProcessProxy(scripted, policy={"method": "vanilla"}, close_engine=False, proxy_api_key=KEY)
    yield p
    p.stop()


def nested(depth: int) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


# 1 ------------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_and_the_connection_stays_usable(proxy):
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        for path in ("/v1/chat/completions", "/v1/completions"):
            for depth in (2000, 100):  # deeper than the parser goes; parsed, but deeper than any request
                bad = client.post(path, content=nested(depth), headers=headers)
                assert "nested more than 64 levels" in error_of(bad, 400, "body")
                body = CHAT if path == "/v1/chat/completions" else {"prompt": "Go.", "max_tokens": 3}
                good = client.post(path, json=body)
                assert good.status_code == 200, good.text
                # the same keep-alive connection answered both
                same = [r.extensions["network_stream"].get_extra_info("client_addr") for r in (bad, good)]
                assert same[0] == same[1]
    assert json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(1) == 0
    assert json_depth(json.loads(nested(900))) == 900


# 2 ------------------------------------------------------------------------------------------------


def test_a_body_over_max_request_bytes_is_413_before_it_is_read(proxy):
    # a Content-Length over the limit: answered at once, no byte of the body sent
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), raw
    r = httpx.Response(413, content=payload)
    assert "1000000000 bytes" in error_of(r, 413, "body", "request_too_large")
    big = dict(CHAT, messages=[{"role": "user", "content": "x" * 20000}])
    error_of(httpx.post(proxy.url + "/v1/chat/completions", json=big), 413, "body", "request_too_large")
    # a chunked body (no Content-Length): refused once the bytes read pass the limit
    data = json.dumps(big).encode()
    chunked = httpx.post(proxy.url + "/v1/chat/completions", content=iter([data[i:i + 1000] for i in range(0, len(data), 1000)]))
    assert "more than 16384" in error_of(chunked, 413, "body", "request_too_large")
    small = json.dumps(CHAT).encode()
    assert httpx.post(proxy.url + "/v1/chat/completions", content=iter([small[:10], small[10:]])).status_code == 200
    assert 'status="413"' in proxy.metrics()
    # the parameter and its flag
    with pytest.raises(CodestopError, match="max_request_bytes"):
        ServeOptions(max_request_bytes=0)
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    parser = sub.choices["serve"]
    assert parser.parse_args([]).max_request_bytes == 8 * 2**20
    assert parser.parse_args([]).host == "127.0.0.1"  # loopback unless asked
    assert parser.parse_args(["--max-request-bytes", "1024"]).max_request_bytes == 1024


# 3 ------------------------------------------------------------------------------------------------

LEAKY = "warming up; Authorization: Bearer sk-live-0123456789abcdef api_key=hunter2hunter2 model at /srv/secret/m.gguf"


def leaky_upstream(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"error": {"message": LEAKY}})


def test_upstream_error_text_stays_out_of_health_and_credentials_are_redacted(toy_tokenizer):
    for secret in ("Bearer sk-live-0123456789abcdef", "api_key=hunter2hunter2", "bearer abcdef.ghij", "sk-proj-AbCdEf123456789",
                   "http://user:pa55word@host/v1", "hf_abcdefghijklmnopqrstuv"):
        cleaned = redact(f"failed: {secret} (retry)")
        assert "[redacted]" in cleaned and cleaned.startswith("failed: ") and cleaned.endswith(" (retry)"), cleaned
    assert redact("the prompt is 3000 tokens; max_tokens: 20") == "the prompt is 3000 tokens; max_tokens: 20"
    assert "hunter2" not in error_message(httpx.Response(500, text=f"oops api_key=hunter2 {'x' * 10}"))

    engine = ServerEngine.connect("http://upstream/v1", wait=False, tokenizer=toy_tokenizer, transport=httpx.MockTransport(leaky_upstream))
    for key in (None, KEY):
        p = InProcessProxy(engine, close_engine=False, proxy_api_key=key)
        try:
            health = httpx.get(p.url + "/health")
            assert health.status_code == 503
            assert not {"error", "last_error"} & set(health.json()), health.json()
            assert "warming" not in health.text and "hunter2" not in health.text
            if key:
                assert health.json() == {"status": "degraded"}
            else:  # no key: the details as before, but not the upstream's words
                assert health.json()["upstream"] == "starting" and health.json()["base_url"] == "http://upstream"
            sent = {"authorization": f"Bearer {key}"} if key else {}
            refused = httpx.post(p.url + "/v1/chat/completions", json=CHAT, headers=sent)
            message = error_of(refused, 503, None, "upstream_not_ready", "upstream_error")
            assert "warming up" in message and "hunter2" not in message and "sk-live" not in message and "[redacted]" in message
            if key:  # the key's holder sees the (redacted) reason
                detail = httpx.get(p.url + "/health", headers=sent).json()
                assert "warming up" in detail["error"] and "hunter2" not in detail["error"]
        finally:
            p.stop()
    engine.close()

    def fail():
        raise CodestopError("tokenizer: could not load with token hf_abcdefghijklmnopqrstuv from /srv/secret")

    p = InProcessProxy(fail)
    try:
        wait_for(lambda: httpx.get(p.url + "/health").json()["status"] == "failed")
        assert httpx.get(p.url + "/health").json() == {"status": "failed"}
        message = error_of(httpx.post(p.url + "/v1/chat/completions", json=CHAT), 503, None, "engine_failed", "server_error")
        assert "hf_abc" not in message and "[redacted]" in message
    finally:
        p.stop()


# 4 ------------------------------------------------------------------------------------------------


def test_with_a_key_only_a_bare_health_is_public(keyed, proxy):
    sent = {"authorization": f"Bearer {KEY}"}
    health = httpx.get(keyed.url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    detail = httpx.get(keyed.url + "/health", headers=sent).json()
    assert detail["status"] == "ok" and detail["model"] == "scripted" and detail["engine"] == "scripted"
    for path in ("/docs", "/openapi.json", "/redoc"):  # off with a key
        for headers in ({}, sent):
            assert path in error_of(httpx.get(keyed.url + path, headers=headers), 404, None, "not_found")
    error_of(httpx.get(keyed.url + "/metrics"), 401, None, "invalid_api_key", "authentication_error")
    assert httpx.get(keyed.url + "/metrics", headers=sent).status_code == 200
    # no key configured: as before
    assert httpx.get(proxy.url + "/health").json()["model"] == "scripted"
    for path in ("/docs", "/openapi.json", "/redoc", "/metrics"):
        assert httpx.get(proxy.url + path).status_code == 200


# 5 ------------------------------------------------------------------------------------------------


class StrictTemplateEngine(ScriptedEngine):
    """A chat template that refuses system-like roles, as some models' templates do."""

    TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('Conversation roles must be user or assistant') }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")

    def chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.TEMPLATE, tokenize=False, add_generation_prompt=True)


def test_an_unknown_role_and_a_max_tokens_the_window_cannot_hold_are_400_through_the_proxy(proxy, scripted, toy_tokenizer):
    r = httpx.post(proxy.url + "/v1/chat/completions", json=dict(CHAT, messages=[{"role": "wizard", "content": "hi"}]))
    assert error_of(r, 400, "messages[0].role").startswith("messages[0].role: 'wizard'")
    for field in ("max_tokens", "max_completion_tokens"):
        r = httpx.post(proxy.url + "/v1/chat/completions", json=dict(CHAT, **{"max_tokens": None, field: 1000000000000}))
        assert "2048" in error_of(r, 400, field)
    error_of(httpx.post(proxy.url + "/v1/completions", json={"prompt": "Go.", "max_tokens": 1e12}), 400, "max_tokens")
    for role in ROLES:  # each renders through the template
        messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Go."}]
        assert f"<|im_start|>{role}\nBe brief." in prepared(scripted, {"messages": messages}).prompt
    strict = StrictTemplateEngine(toy_tokenizer, "Step.", window=2048)
    status, body = refusal(strict, {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "Go."}]})
    assert (status, body["error"]["param"]) == (400, "messages") and "roles must be user or assistant" in body["error"]["message"]
    # under the window, max_tokens passes here: whether it fits beside the prompt is known once the prompt is
    # tokenized, at the run (test_a_prompt_and_max_tokens_over_the_window_are_a_400_as_vllms)
    assert prepared(scripted, dict(CHAT, max_tokens=2047)).config.max_tokens == 2047


# 6 ------------------------------------------------------------------------------------------------


def test_the_auth_scheme_is_case_insensitive_and_the_key_is_not(keyed):
    for value in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"bEaReR  {KEY}"):
        assert httpx.get(keyed.url + "/v1/models", headers={"authorization": value}).status_code == 200, value
    for value in (KEY, f"Basic {KEY}", f"Bearer {KEY.upper()}", f"Bearer{KEY}", f"Bearer {KEY}x", "Bearer", ""):
        r = httpx.get(keyed.url + "/v1/models", headers={"authorization": value})
        error_of(r, 401, None, "invalid_api_key", "authentication_error")
    r = httpx.post(keyed.url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"bearer {KEY}"})
    assert r.status_code == 200
    # the key is checked before the body is read: a bad body without the key is a 401, not a 400
    headers = {"authorization": "Bearer wrong", "content-type": "application/json"}
    error_of(httpx.post(keyed.url + "/v1/chat/completions", content=b"{not json", headers=headers), 401, None, "invalid_api_key",
             "authentication_error")


# 7 ------------------------------------------------------------------------------------------------


def test_an_upstream_that_accepts_and_never_answers_is_a_504_not_a_503(toy_tokenizer):
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # the kernel accepts; nobody answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    try:
        engine = ServerEngine.connect(url, wait=False, timeout=0.5, tokenizer=toy_tokenizer)
        assert not engine.connected
        p = InProcessProxy(engine)
        try:
            r = httpx.post(p.url + "/v1/chat/completions", json=CHAT, timeout=30)
            assert "did not answer within 0.5 s" in error_of(r, 504, None, "upstream_timeout", "upstream_error")
        finally:
            p.stop()
        # a request that queued behind that attempt waited as long: a 504 too
        engine = ServerEngine.connect(url, wait=False, timeout=0.5, tokenizer=toy_tokenizer)
        errors: list[BaseException] = []

        def wait_ready() -> None:
            try:
                asyncio.run(engine.ready())
            except BaseException as err:  # noqa: BLE001 - collected
                errors.append(err)

        threads = [threading.Thread(target=wait_ready) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 2 and all(isinstance(e, ServerTimeout) and e.status == 504 for e in errors), errors
        engine.close()
    finally:
        silent.close()


# 8 ------------------------------------------------------------------------------------------------


def test_an_unknown_server_engine_option_is_an_error_naming_it():
    with pytest.raises(CodestopError) as err:
        codestop.load("m", base_url="http://127.0.0.1:9/v1", retires=7, timout=1)
    message = str(err.value)
    assert message.startswith("retires, timout: unknown options of the server engine")
    assert "retries" in message and "timeout" in message and "concurrency" in message
    with pytest.raises(CodestopError, match="threads: unknown option of the server engine"):
        codestop.load("m", base_url=["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"], threads=2)
    with pytest.raises(CodestopError, match="retires"):
        ServerEngine.connect("http://127.0.0.1:9/v1", retires=7)
    # what `codestop serve` passes is all known: an upstream not up yet gives an engine that waits for it
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["serve"].parse_args(["--base-url", f"http://127.0.0.1:{free_port()}/v1", "--timeout", "5", "--retries", "1",
                                            "--concurrency", "2", "--api-key", "k"])
    engine = build_engine(engine_spec(args))
    assert isinstance(engine, ServerEngine) and not engine.connected and engine.options.retries == 1
    engine.close()


# 9 ------------------------------------------------------------------------------------------------
# The validation table: every field a request may get wrong, refused with a 400 (a 404 for a model
# not served) naming it, in OpenAI's shape. Defaults: policy codestop, a 2048-token window.

MESSAGES = [{"role": "user", "content": "Go."}]
TOOL = {"type": "function", "function": {"name": "f"}}


def chat(**fields) -> tuple[bool, dict]:
    return True, {"messages": MESSAGES, **fields}


def completion(**fields) -> tuple[bool, dict]:
    return False, {"prompt": "Go.", **fields}


REFUSED = [  # (endpoint and body, status, param, code)
    # the codestop field: a policy and its knobs, generation fields
    (chat(codestop={"taux": 3}), 400, "codestop.taux", "unknown_parameter"),  # as an unknown field
    (chat(codestop={"tau": -1}), 400, "codestop.tau", None),
    (chat(codestop={"method": "magic"}), 400, "codestop.method", None),
    (chat(codestop={"method": 7}), 400, "codestop.method", None),
    (chat(codestop={"method": "deer", "tau": 3}), 400, "codestop.tau", "unknown_parameter"),  # not a knob of deer
    (chat(codestop={"threshold": 0.5}), 400, "codestop.threshold", "unknown_parameter"),  # not a knob of the default
    (chat(codestop={"confidence": "loudest"}), 400, "codestop.confidence", None),
    (chat(codestop={"confidence": ["mean"]}), 400, "codestop.confidence", None),
    (chat(codestop={"method": "budget", "budget": 0}), 400, "codestop.budget", None),
    (chat(codestop="fast"), 400, "codestop", None),
    (chat(codestop={"boundaries": "\n"}), 400, "codestop.boundaries", None),
    (chat(codestop={"probe_interval": -1}), 400, "codestop.probe_interval", None),
    (chat(codestop={"live_text": True}), 400, "codestop.live_text", "unknown_parameter"),  # set by the proxy, not by clients
    (chat(codestop={"answer": "long"}), 400, "codestop.answer", None),
    (chat(codestop={"family": "llama9"}), 400, "codestop.family", None),
    (chat(codestop={"max_new_tokens": 0}), 400, "codestop.max_reasoning_tokens", None),  # the old name, read as the new
    # OpenAI's fields: wrong types and values
    (chat(temperature="hot"), 400, "temperature", None),
    (chat(temperature=-1), 400, "temperature", None),
    (chat(top_p=0), 400, "top_p", None),
    (chat(top_k=1.5), 400, "top_k", None),
    (chat(seed="1"), 400, "seed", None),
    (chat(max_tokens=0), 400, "max_tokens", None),
    (chat(max_tokens=True), 400, "max_tokens", None),
    (chat(max_tokens=1e12), 400, "max_tokens", None),  # a float: no integer
    (chat(max_tokens=1000000000000), 400, "max_tokens", None),  # more than the window holds: not clamped
    (chat(max_completion_tokens=-3), 400, "max_completion_tokens", None),
    (chat(max_completion_tokens=2048), 400, "max_completion_tokens", None),
    (completion(max_tokens=2048), 400, "max_tokens", None),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (chat(stop=[""]), 400, "stop", None),
    (chat(stop=7), 400, "stop", None),
    (chat(stream="yes"), 400, "stream", None),
    (chat(stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage", None),
    (chat(stream_options=[]), 400, "stream_options", None),
    (chat(model=3), 400, "model", None),
    (chat(reasoning_effort="extreme"), 400, "reasoning_effort", None),
    (chat(reasoning_effort=3), 400, "reasoning_effort", None),
    (completion(reasoning_effort="low"), 400, "reasoning_effort", "unknown_parameter"),  # a chat template's
    # null means unset, but not where the request needs the field: refused as the wrong type
    (chat(messages=None), 400, "messages", None),
    (completion(prompt=None), 400, "prompt", None),
    (chat(model="gpt-4o"), 404, "model", "model_not_found"),
    (completion(model="gpt-4o"), 404, "model", "model_not_found"),
    # what the proxy cannot honour is refused, never ignored
    (chat(n=2), 400, "n", "unsupported_parameter"),
    (chat(n=True), 400, "n", "unsupported_parameter"),  # True is no 1
    (chat(best_of=2), 400, "best_of", "unsupported_parameter"),
    (completion(tools=[TOOL]), 400, "tools", "unsupported_parameter"),  # a chat's: tests/test_serve_agents.py
    (chat(tool_choice="auto"), 400, "tool_choice", None),  # no tools to choose from
    (chat(functions=[{"name": "f"}]), 400, "functions", "unsupported_parameter"),
    (chat(function_call="auto"), 400, "function_call", "unsupported_parameter"),
    (completion(response_format={"type": "json_object"}), 400, "response_format", "unsupported_parameter"),
    (chat(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    (chat(top_logprobs=2), 400, "top_logprobs", "unsupported_parameter"),
    (chat(logit_bias={"42": 5}), 400, "logit_bias", "unsupported_parameter"),
    (chat(presence_penalty=0.5), 400, "presence_penalty", "unsupported_parameter"),
    (chat(frequency_penalty=-1), 400, "frequency_penalty", "unsupported_parameter"),
    (completion(echo=True), 400, "echo", "unsupported_parameter"),
    (completion(suffix="!"), 400, "suffix", "unsupported_parameter"),
    (completion(logprobs=2), 400, "logprobs", "unsupported_parameter"),
    # what OpenAI does not know is unknown: named, whatever else is wrong
    (chat(repetition_penalty=1.1), 400, "repetition_penalty", "unknown_parameter"),
    (chat(repetition_penalty=1.1, temperature="hot"), 400, "repetition_penalty", "unknown_parameter"),
    (chat(prompt="Go."), 400, "prompt", "unknown_parameter"),
    (completion(messages=MESSAGES), 400, "messages", "unknown_parameter"),
    # the conversation, the prompt
    ((True, {}), 400, "messages", None),
    (chat(messages=[]), 400, "messages", None),
    (chat(messages="Go."), 400, "messages", None),
    (chat(messages=["Go."]), 400, "messages[0]", None),
    (chat(messages=[{"content": "x"}]), 400, "messages[0].role", None),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", None),
    (chat(messages=[*MESSAGES, {"role": "wizard", "content": "x"}]), 400, "messages[1].role", None),
    (chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content", None),
    ((False, {}), 400, "prompt", None),
    (completion(prompt=""), 400, "prompt", None),
    (completion(prompt=["one", "two"]), 400, "prompt", None),
    (completion(prompt=[1, 2, 3]), 400, "prompt", None),
]


@pytest.mark.parametrize(("request_", "status", "param", "code"), REFUSED,
                         ids=[f"{'chat' if c[0][0] else 'completion'}-{json.dumps(c[0][1])[:60]}" for c in REFUSED])
def test_a_request_a_field_of_which_is_wrong_is_refused_naming_it(scripted, request_, status, param, code):
    is_chat, body = request_
    got, error = refusal(scripted, body, is_chat)
    assert (got, error["error"]["param"], error["error"]["code"]) == (status, param, code), error
    assert error["error"]["type"] == "invalid_request_error" and sorted(error["error"]) == ["code", "message", "param", "type"]
    assert error["error"]["message"].startswith(f"{param}: "), error  # the message names it first, as the param


def test_what_clients_send_is_honoured_and_neutral_fields_are_accepted(scripted):
    neutral = {"user": "u1", "safety_identifier": "s1", "prompt_cache_key": "k1", "prompt_cache_retention": "24h",
               "audio": None, "modalities": None, "temperature": None, "codestop": None,
               "presence_penalty": 0, "frequency_penalty": 0.0, "n": 1, "best_of": 1, "logprobs": False, "top_logprobs": 0,
               "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "response_format": {"type": "text"},
               "logit_bias": {}, "stream_options": {"include_usage": False, "include_obfuscation": True}, "metadata": {"k": "v"},
               "store": False, "service_tier": "auto", "parallel_tool_calls": True, "model": "scripted", "stream": False}
    prep = prepared(scripted, {"messages": MESSAGES, **neutral})
    assert prep.config == DEFAULT_CONFIG and prep.policy is DEFAULTS.policy  # the defaults, the policy not built again
    assert prepared(scripted, {"prompt": "Go.", "echo": False, "suffix": "", **neutral}, chat=False).config == DEFAULT_CONFIG.replace(answer="none")
    honoured = prepared(scripted, {"messages": MESSAGES, "temperature": 0, "top_p": 0.5, "top_k": 4, "seed": 3, "max_tokens": 9,
                                   "max_completion_tokens": 8, "stop": "zz", "stream": True, "stream_options": {"include_usage": True}})
    c = honoured.config
    assert (c.temperature, c.top_p, c.top_k, c.seed, c.max_tokens, c.stop, c.live_text) == (0, 0.5, 4, 3, 8, ("zz",), True)
    assert honoured.stream and honoured.include_usage and honoured.model == "scripted"
    asked = prepared(scripted, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Go"}, {"type": "text", "text": "."}]}],
                                "codestop": {"tau": 3.5, "max_new_tokens": 64, "answer": "boxed", "family": "think"}})
    assert (asked.policy.name, asked.policy.tau, asked.config.max_reasoning_tokens, asked.config.answer) == ("codestop", 3.5, 64, "boxed")
    assert asked.question == "Go." and asked.prompt.endswith("<think>\n")
    assert prepared(scripted, {"prompt": ["Once upon"]}, chat=False).prompt == "Once upon"


def test_the_default_policy_is_validated_once_at_start_up(scripted, monkeypatch):
    from starlette.testclient import TestClient

    from codestop.serve import serving

    built = []
    monkeypatch.setattr(serving, "make_policy", lambda *spec, **knobs: built.append(spec) or make_policy(*spec, **knobs))
    app = create_app(scripted, ServeOptions(policy={"method": "budget", "budget": 3}, close_engine=False))
    assert len(built) == 1
    with TestClient(app) as client:
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=CHAT).json()["usage"]["codestop"]["stop_reason"] == "budget"
        assert len(built) == 1  # requests that ask for no policy get the one built at start-up
        assert client.post("/v1/chat/completions", json=dict(CHAT, codestop={"budget": 2})).status_code == 200
        assert len(built) == 2
    # a bad default ends `codestop serve` before any engine is built: one line, no traceback
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["serve"].parse_args(["--model", "/nowhere/x.gguf", "--method", "deer", "--tau", "3"])
    with pytest.raises(CodestopError, match=r"^tau: 3.0 is not an option of method 'deer'"):
        args.func(args)


# 8 ------------------------------------------------------------------------------------------------

UPSTREAM_KEY = "UpstreamPlainKey0123456789abcdef"  # no key shape redact() knew before: only its literal value
PROXY_KEY = "ProxyPlainKey0123456789abcdef"
ENV_KEY = "EnvPlainKey0123456789abcdef"


class EchoingUpstream:
    """A real HTTP server (uvicorn on loopback) that answers like vLLM where told to, and otherwise
    with ``status`` and a body (and a header) quoting every key it was ever given, as OpenAI's
    "Incorrect API key provided: ..." does."""

    def __init__(self) -> None:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.status = {"models": 200, "completions": 200}
        app = FastAPI()

        def echo(status: int) -> JSONResponse:
            quoted = f"Incorrect API key provided: {UPSTREAM_KEY}; also {PROXY_KEY} and {ENV_KEY}"
            return JSONResponse({"error": {"message": quoted, "type": "invalid_request_error", "code": "invalid_api_key"}},
                                status_code=status, headers={"x-echo": UPSTREAM_KEY})

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            if self.status["models"] != 200:
                return echo(self.status["models"])
            return JSONResponse({"object": "list", "data": [{"id": "toy", "object": "model", "owned_by": "vllm"}]})

        @app.post("/v1/completions")
        async def completions() -> JSONResponse:
            return echo(self.status["completions"])

        self.port = free_port()
        self.server, self.thread = serve_in_thread(app, self.port)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def keyless(r: httpx.Response, keys: tuple[str, ...] = (UPSTREAM_KEY, PROXY_KEY)) -> str:
    """The whole response (status line, headers, body) as text, checked to hold none of ``keys``."""
    whole = f"{r.status_code}\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items()) + "\n" + r.text
    for key in keys:
        assert key not in whole, whole
    return whole


@pytest.fixture
def echoing():
    upstream = EchoingUpstream()
    yield upstream
    upstream.stop()


def test_no_configured_key_is_relayed_in_an_upstreams_error(echoing, toy_tokenizer, caplog):
    """Issue 26: the upstream's key (and the proxy's) never reaches a client or a log line, whatever
    shape it has: the 401, 400 and 500 that quote it come back with "[redacted]" in its place."""
    caplog.set_level("DEBUG")
    engine = ServerEngine.connect(echoing.url, api_key=UPSTREAM_KEY, tokenizer=toy_tokenizer, retries=0, backoff=0.01)
    p = InProcessProxy(engine, proxy_api_key=PROXY_KEY)
    sent = {"authorization": f"Bearer {PROXY_KEY}"}
    try:
        for status in (401, 400, 500):
            echoing.status["completions"] = status
            for stream in (False, True):
                r = httpx.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": stream}, headers=sent, timeout=30)
                whole = keyless(r)
                # its words, relayed: a 400 as the client's error, a refused key or a failure as a 502
                assert r.status_code == {401: 502, 400: 400, 500: 502}[status], whole
                assert "Incorrect API key provided: [redacted]" in whole, whole
            r = httpx.post(p.url + "/v1/completions", json={"prompt": "Go.", "max_tokens": 3}, headers=sent, timeout=30)
            assert "Incorrect API key provided: [redacted]" in keyless(r)
        echoing.status["models"] = 500  # /health asks the upstream's /v1/models: the key holder reads its error
        health = httpx.get(p.url + "/health", headers=sent)
        assert health.status_code == 503 and "Incorrect API key provided: [redacted]" in keyless(health)
        # a log line that carries a key (a failure's message, its traceback) is redacted too
        try:
            raise ServerTimeout(f"upstream said {UPSTREAM_KEY}")
        except ServerTimeout:
            logging.getLogger("codestop.serve").exception("answer failed: %s", PROXY_KEY)
    finally:
        p.stop()
        engine.close()
    logged = "\n".join(f"{r.getMessage()}\n{r.exc_text or ''}" for r in caplog.records)
    assert "answer failed: [redacted]" in logged and "upstream said [redacted]" in logged
    assert all(key not in logged for key in (UPSTREAM_KEY, PROXY_KEY)), logged


def test_the_serve_commands_keys_and_the_environments_are_never_relayed(echoing, monkeypatch):
    """``codestop serve --api-key K --proxy-api-key P`` (and a key from $OPENAI_API_KEY) in front of an
    upstream whose every answer quotes them: the proxy's 503s, /health and the CLI's error line say
    why without them."""
    from codestop.cli.serve import make_app

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    echoing.status.update(models=500, completions=500)
    for flags, env in ((["--api-key", UPSTREAM_KEY, "--proxy-api-key", PROXY_KEY], None), ([], ENV_KEY)):
        if env:
            monkeypatch.setenv("OPENAI_API_KEY", env)
            monkeypatch.delenv("CODESTOP_UPSTREAM_API_KEY", raising=False)
        args = parser.parse_args(["serve", "--base-url", echoing.url, "--retries", "0", *flags])
        p = InProcessProxy.__new__(InProcessProxy)  # the CLI's app, served as the other proxies here
        p.app, p.port = make_app(args), free_port()
        p.server, p.thread = serve_in_thread(p.app, p.port)
        sent = {"authorization": f"Bearer {PROXY_KEY}"} if "--proxy-api-key" in flags else {}
        try:
            served = p.app.state.served
            wait_for(lambda s=served: s.engine is not None or s.load_error is not None)
            assert served.load_error is None, served.load_error
            r = httpx.post(p.url + "/v1/chat/completions", json=CHAT, headers=sent, timeout=30)
            keys = (ENV_KEY,) if env else (UPSTREAM_KEY, PROXY_KEY)
            assert r.status_code == 503 and "Incorrect API key provided: [redacted]" in keyless(r, keys)
            health = keyless(httpx.get(p.url + "/health", headers=sent), keys)
            assert ("Incorrect API key provided: [redacted]" in health) == bool(sent), health  # the error: the key's holder's
        finally:
            p.stop()
    # every key configured in this process, the environment's included, is redacted from any text
    assert redact(f"x {ENV_KEY} y") == "x [redacted] y" and redact(f"x {UPSTREAM_KEY}") == "x [redacted]"


# 10 -----------------------------------------------------------------------------------------------
# Issue 27: what a battery of real clients found


def test_fields_real_clients_send_are_accepted_and_a_null_is_unset(proxy):
    """The openai client, LangChain, LiteLLM and openai-agents send reasoning_effort, tags that change
    nothing, and (some) every unset field as null: each got a 400 unknown_parameter."""
    sent = dict(CHAT, reasoning_effort="high", safety_identifier="user-1", prompt_cache_key="k", prompt_cache_retention="24h",
                audio=None, modalities=None, stream=None, stop=None)
    r = httpx.post(proxy.url + "/v1/chat/completions", json=sent)
    assert r.status_code == 200, r.text
    message = error_of(httpx.post(proxy.url + "/v1/chat/completions", json=dict(CHAT, messages=None)), 400, "messages")
    assert message.startswith("messages: None must be")  # what the request cannot go without: refused, as what it is
    assert httpx.post(proxy.url + "/v1/completions", json={"prompt": "Go.", "max_tokens": 3, "audio": None}).status_code == 200
    # the openai client as a user calls it (an explicit None is sent as null)
    r = proxy.client().chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=3, reasoning_effort="low",
                                               safety_identifier="user-1", prompt_cache_key="k", prompt_cache_retention="24h",
                                               audio=None, modalities=None)
    assert r.usage.completion_tokens == 3


GPT_OSS = (__import__("pathlib").Path(__file__).parent / "fixtures" / "chat_templates" / "gpt-oss.jinja").read_text()


class HarmonyEngine(ScriptedEngine):
    """gpt-oss's real chat template, rendered with the template variables the family sets."""

    def chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=GPT_OSS, tokenize=False, add_generation_prompt=True,
                                                  strftime_now=lambda fmt: "2026-12-06", **kwargs)


def test_reasoning_effort_is_gpt_oss_template_variable_and_changes_nothing_elsewhere(scripted, toy_tokenizer):
    harmony = HarmonyEngine(toy_tokenizer, "Step.", window=2048)
    body = {"messages": MESSAGES, "codestop": {"family": "gpt-oss"}}
    assert "Reasoning: medium" in prepared(harmony, body).prompt  # the template's own default
    for effort in ("low", "high"):
        prep = prepared(harmony, dict(body, reasoning_effort=effort))
        assert f"Reasoning: {effort}" in prep.prompt and prep.prompt.endswith("<|channel|>analysis<|message|>")
    status, error = refusal(harmony, dict(body, reasoning_effort="minimal"))  # no effort gpt-oss was trained on
    assert (status, error["error"]["param"]) == (400, "reasoning_effort") and "low, medium, high" in error["error"]["message"]
    # a family with no notion of effort: accepted, the prompt as without it
    assert prepared(scripted, {"messages": MESSAGES, "reasoning_effort": "minimal"}).prompt == prepared(scripted, {"messages": MESSAGES}).prompt


def test_a_lone_surrogate_is_a_400_naming_the_field_not_a_500(proxy):
    headers = {"content-type": "application/json"}
    cases = [("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 3}', "messages[0].content"),
             ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
              "messages[0].content[0].text"),
             ("/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 3}', "prompt"),
             ("/v1/completions", b'{"prompt": "Go.", "stop": ["\\ud800"]}', "stop[0]")]
    for path, raw, param in cases:
        message = error_of(httpx.post(proxy.url + path, content=raw, headers=headers), 400, param)
        assert message.startswith(f"{param}: ") and "lone UTF-16 surrogate" in message, message
    pair = b'{"prompt": "hi \\ud83d\\ude00", "max_tokens": 3}'  # a pair is one character: fine
    assert httpx.post(proxy.url + "/v1/completions", content=pair, headers=headers).status_code == 200


def test_a_prompt_and_max_tokens_over_the_window_are_a_400_as_vllms(proxy):
    """The battery's ``"word " * 1500`` (1,500 tokens to a real tokenizer; "Step" is one word of the
    toy's) with max_tokens 1000 on a 2,048-token window: it ran, cut at the window."""
    for stream in (False, True):
        r = httpx.post(proxy.url + "/v1/completions", json={"prompt": "Step " * 1500, "max_tokens": 1000, "stream": stream})
        message = error_of(r, 400, "prompt", "context_length_exceeded")
        assert "2048-token context window" in message and "max_tokens asks for 1000" in message, message
    r = httpx.post(proxy.url + "/v1/chat/completions", json=dict(CHAT, messages=[{"role": "user", "content": "Step " * 1500}], max_tokens=1000))
    error_of(r, 400, "messages", "context_length_exceeded")


def test_the_clients_max_tokens_is_the_stop_reason_when_it_was_the_cap(proxy):
    """It said max_reasoning_tokens, a cap the client never set."""
    before = proxy.metrics().count('codestop_stops_total{reason="max_tokens"} 1.0')
    usage = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT).json()["usage"]
    cs = usage["codestop"]
    assert (cs["stop_reason"], cs["stopped_early"], usage["completion_tokens"]) == ("max_tokens", False, 3)
    assert before == 0 and 'codestop_stops_total{reason="max_tokens"}' in proxy.metrics()
    # probes: a count here, a list in results: the count is probe_count; the old keys stay for one release
    assert cs["probe_count"] == cs["probes"] == 0 and cs["stop_position"] == cs["reasoning_tokens"] == 3


def test_a_plain_models_answer_marker_follows_one_blank_line(toy_tokenizer):
    """The proxy's chat answer after a stop: a step ends at a blank line and the marker opened with
    another, four newlines in the content."""
    engine = ScriptedEngine(toy_tokenizer, "Step one.\n\nStep two.\n\nDone.", answer="5}")
    p = InProcessProxy(engine, close_engine=False)
    try:
        body = {"messages": MESSAGES, "codestop": {"method": "deer", "threshold": 0.5, "probe_interval": 1}}
        r = httpx.post(p.url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        content, cs = r.json()["choices"][0]["message"]["content"], r.json()["usage"]["codestop"]
        assert cs["stop_reason"] == "threshold" and content.startswith("Step one.\n\n**Final Answer**\n\n"), content
    finally:
        p.stop()
