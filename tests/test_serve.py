"""``codestop serve`` with the official ``openai`` client, in front of a REAL llama.cpp server
(SmolLM2-135M on loopback; see tests/test_server_engine.py for how it is started and for the
fault-injecting proxy). Reliability: a load of 16 concurrent clients x 2 requests, an upstream
killed mid-stream, an upstream that hangs, bad requests, and no leaks between load rounds.
Clients that leave (mid-stream, before the first byte, during a plain request) run on a slow
scripted in-process engine that counts its sessions.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from harness import POEM, SHORT, InProcessProxy, ask, free_port, proxy_over, scrape, wait_for
from llama_servers import FaultProxy, LlamaServer
from scripted import ScriptedBackend, ScriptedEngine

from codestop.config import GenerationConfig
from codestop.engines.server import ServerEngine
from codestop.errors import CodestopError, redact
from codestop.families import FAMILIES
from codestop.serve import ServeOptions, create_app
from codestop.serve.defaults import DEFAULT_CONFIG
from codestop.serve.protocol import parse_request
from codestop.serve.serving import Splitter, prepare, server_defaults

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


proxy = proxy_over("llama")


# --------------------------------------------------------------------------------------------
# The OpenAI surface
# --------------------------------------------------------------------------------------------


def test_the_openai_client_works_unchanged_streaming_or_not(proxy):
    client = proxy.client()
    model = proxy.app.state.served.engine.model_name
    assert [m.id for m in client.models.list().data] == [model]  # the upstream's names

    r = ask(client, "What is 12 + 30?", temperature=0, model=model)
    msg = r.choices[0].message
    # one request, no probe within 16 tokens: the server's own greedy tokens, and SmolLM2 goes on past 16
    assert r.choices[0].finish_reason == "length" and msg.content and r.model == model
    assert "**Final Answer**" not in msg.content  # no probe within 16 tokens: nothing appended
    assert "reasoning_content" not in (msg.model_extra or {})  # a plain family: everything is content
    usage = r.usage
    assert usage.completion_tokens == usage.codestop["reasoning_tokens"] + usage.codestop["answer_tokens"] <= SHORT
    assert usage.completion_tokens_details.reasoning_tokens == 0
    for key in ("probe_tokens", "stop_reason", "cost_tokens", "probes", "policy"):
        assert key in usage.codestop

    stream = ask(client, "What is 12 + 30?", temperature=0, stream=True, stream_options={"include_usage": True})
    *chunks, last = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == msg.content  # greedy: streaming gives the same answer
    assert last.choices == [] and last.usage.codestop["stop_reason"] == usage.codestop["stop_reason"]
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.usage is None for c in ask(client, "Hi", stream=True, max_tokens=4))  # usage only when asked

    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens <= 12
    *streamed, usage_chunk = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                                       temperature=0, stream=True, stream_options={"include_usage": True})
    assert "".join(x.choices[0].text for x in streamed) == c.choices[0].text
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == c.usage.completion_tokens


def test_the_policy_is_chosen_per_request_over_the_server_default(proxy):
    client = proxy.client()
    # the poem goes on for longer than these budgets whatever the model's numerics: a probe at the
    # first space after 4 tokens, and a budget of 5 are always reached (a short question's answer,
    # "3 + 4 = 7", may end before either)
    r = ask(client, POEM, max_tokens=40, extra_body={"codestop": {"method": "deer", "threshold": 0.5, "probe_interval": 4, "boundaries": [" "]}})
    cs = r.usage.codestop
    assert cs["policy"] == {"method": "deer", "threshold": 0.5, "confidence": "mean", "answer_from": "stop"}
    assert cs["probes"] >= 1 and cs["probe_tokens"] >= 1, (cs, r.choices[0].message)
    r = ask(client, POEM, max_tokens=40, extra_body={"codestop": {"method": "budget", "budget": 5}})
    assert r.usage.codestop["reasoning_tokens"] == 5 and r.usage.codestop["stop_reason"] == "budget"
    r = ask(client, "What is 3 + 4?", extra_body={"codestop": {"tau": 3.5}})  # the default method, one knob changed
    assert r.usage.codestop["policy"]["method"] == "codestop" and r.usage.codestop["policy"]["tau"] == 3.5


def test_bad_requests_are_400_naming_the_field(proxy, llama):
    """The wiring through the openai client (every case: tests/test_serve_input.py's table)."""
    client = proxy.client()
    cases = [({"codestop": {"tau": -1}}, "codestop.tau", None), ({"n": 2}, "n", "unsupported_parameter"),
             ({"repetition_penalty": 1.1}, "repetition_penalty", "unknown_parameter"), ({"temperature": "hot"}, "temperature", None)]
    for extra, param, code in cases:
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, "hi", extra_body=extra)
        assert (err.value.body["param"], err.value.code, err.value.body["type"]) == (param, code, "invalid_request_error")
        assert err.value.body["message"].startswith(param)
    for body, param in ((b"{not json", "body"), (json.dumps({}).encode(), "messages"),
                        (json.dumps({"messages": [{"content": "x"}]}).encode(), "messages[0].role")):
        r = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    # larger than the model's window: 400 context_length_exceeded, and the proxy carries on
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, "word " * 2500, stream=stream)
        assert err.value.code == "context_length_exceeded" and "2048" in err.value.message
    assert ask(client, "What is 1 + 1?").choices[0].message.content


def test_a_thinking_family_streams_reasoning_content_then_content(llama):
    engine = ServerEngine.connect(llama.url + "/v1", backoff=0.05)
    p = InProcessProxy(engine, config=GenerationConfig(family="think", answer="free"), policy={"method": "budget", "budget": 12})
    try:
        client = p.client()
        r = ask(client, POEM, temperature=0, max_tokens=40)
        msg, usage = r.choices[0].message, r.usage
        reasoning = msg.model_extra["reasoning_content"]
        assert reasoning and msg.content.strip() == msg.content and msg.content
        assert not any(m in reasoning for m in ("<think>", "</think>", "<|im_end|>")), reasoning
        assert "<|im_end|>" not in msg.content and not msg.content.startswith("</think>")  # the rest is the model's
        # the policy stopped the thinking: codestop closed it, and the model answered in its own words
        assert usage.codestop["stop_reason"] == "budget" and usage.codestop["answer_tokens"] >= 1
        assert "**Final Answer**" not in msg.content and usage.completion_tokens <= 40
        assert usage.completion_tokens_details.reasoning_tokens == usage.codestop["reasoning_tokens"] == 12
        boxed = ask(client, POEM, temperature=0, max_tokens=40, extra_body={"codestop": {"answer": "boxed"}})
        assert boxed.choices[0].message.content.startswith("**Final Answer**\n\nThe final answer is \\boxed{")
        chunks = [c for c in ask(client, POEM, temperature=0, max_tokens=40, stream=True) if c.choices]
        kinds = [("r" if (c.choices[0].delta.model_extra or {}).get("reasoning_content") else "c") for c in chunks
                 if c.choices[0].delta.content or (c.choices[0].delta.model_extra or {}).get("reasoning_content")]
        assert kinds == sorted(kinds, key=lambda k: k == "c")  # all reasoning first, then the answer
        assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks) == reasoning
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    finally:
        p.stop()


def test_splitter_hides_a_think_marker_split_across_events():
    s = Splitter(FAMILIES["think"], split=True)
    out = []
    for kind, text in [("reasoning", "so 2+2=4 </th"), ("reasoning", "ink>\n\nThe answer"), ("answer", " is 4")]:
        out += s.feed(kind, text)
    out += s.flush()
    joined = {k: "".join(t for kk, t in out if kk == k) for k in ("reasoning_content", "content")}
    assert joined == {"reasoning_content": "so 2+2=4 ", "content": "The answer is 4"}  # the answer's opening blank lines too
    s = Splitter(FAMILIES["think"], split=True)  # codestop's own forced close is hidden too
    out = s.feed("reasoning", "hmm <") + s.feed("answer", "\n</think>\n\n**Final Answer**\n\nThe final answer is \\boxed{") + s.flush()
    assert out == [("reasoning_content", "hmm "), ("reasoning_content", "<"), ("content", "**Final Answer**\n\nThe final answer is \\boxed{")]
    # gpt-oss: its channel markup is no text either, even split across events
    s = Splitter(FAMILIES["gpt-oss"], split=True)
    events = [("reasoning", "<|chan"), ("reasoning", "nel|>analysis<|message|>Two and two"), ("reasoning", " is four.<|end|><|start|>assistant"),
              ("reasoning", "<|channel|>final<|message|>4")]
    out = [x for kind, text in events for x in s.feed(kind, text)] + s.flush()
    assert out == [("reasoning_content", "Two and two"), ("reasoning_content", " is four."), ("content", "4")]
    s = Splitter(FAMILIES["plain"], split=True)  # a plain family: everything is content, as written
    assert s.feed("reasoning", "\n\nHi <|channel|>") + s.flush() == [("content", "\n\nHi <|channel|>")]


def test_the_proxy_key_is_required_when_set_and_health_and_metrics_answer(llama):
    engine = ServerEngine.connect(llama.url + "/v1", backoff=0.05)
    p = InProcessProxy(engine, proxy_api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            p.client(api_key="wrong").models.list()  # /v1/models is refused too, but not counted
        with pytest.raises(openai.AuthenticationError) as refused:
            ask(p.client(api_key="wrong"), "Hi!")
        assert refused.value.body["code"] == "invalid_api_key"
        assert ask(p.client(api_key="s3cret"), "Hi!").choices[0].message.content
        health = httpx.get(p.url + "/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}  # bare without the key
        assert httpx.get(p.url + "/metrics").status_code == 401
        text = httpx.get(p.url + "/metrics", headers={"authorization": "Bearer s3cret"}).text
        assert re.search(r'^codestop_requests_total\{endpoint="chat",status="401"\} 1\.0$', text, re.MULTILINE)
        assert re.search(r'^codestop_requests_total\{endpoint="chat",status="200"\} 1\.0$', text, re.MULTILINE)
        assert re.search(r'^codestop_tokens_total\{kind="reasoning"\} [1-9]', text, re.MULTILINE)
        assert re.search(r'^codestop_stops_total\{reason="\w+"\} 1\.0$', text, re.MULTILINE)
        assert re.search(r'^codestop_request_duration_seconds_count\{endpoint="chat"\} 2\.0$', text, re.MULTILINE)
        assert re.search(r"^codestop_requests_in_flight 0\.0$", text, re.MULTILINE)
        assert re.search(r"^process_cpu_seconds_total [0-9.e+-]+$", text, re.MULTILINE)
        counters = engine.counters()
        assert counters, "the server engine counts its upstream requests"
        for name, by_kind in counters.items():
            for kind in by_kind:
                label = f'{{kind="{kind}"}}' if kind else ""
                assert f"codestop_{name.removesuffix('_total')}_total{label} " in text, (name, kind)
    finally:
        p.stop()


def test_the_401_says_whole_how_to_send_the_key_and_keys_are_still_redacted(toy_tokenizer):
    """The key check's message is not taken for a credential by the proxy's own redaction (it read
    "invalid or missing API key (Authorization: [redacted]"); a key in the same shape still is."""
    from starlette.testclient import TestClient

    app = create_app(ScriptedEngine(toy_tokenizer, "Step. "), ServeOptions(proxy_api_key="s3cret-key"))
    with TestClient(app) as client:
        for headers in ({}, {"authorization": "Bearer wrong-key"}):
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["message"] == "invalid or missing API key (Authorization: Bearer ...)"
    for text, clean in (("(Authorization: Bearer s3cret-key)", "(Authorization: [redacted])"),
                        ("(Authorization: Bearer sk-abcdef0123456789)", "(Authorization: [redacted])"),
                        ("sent Bearer abcd.efgh ...", "sent Bearer [redacted] ..."), ("api_key=... or api_key=hunter2", "api_key=... or api_key=[redacted]")):
        assert redact(text) == clean, text


def test_an_in_process_engine_serves_too(tiny_engine):
    p = InProcessProxy(tiny_engine, policy={"method": "vanilla"}, close_engine=False)  # the engine is shared
    try:
        r = ask(p.client(), "What is 2 + 2?", max_tokens=8, temperature=0)
        assert r.usage.codestop["reasoning_tokens"] == 8 and r.model == "tiny-qwen3"
        assert r.usage.codestop["stop_reason"] == "max_tokens" and r.choices[0].finish_reason == "length"  # the client's cap
    finally:
        p.stop()


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


def test_an_upstream_killed_mid_stream_gives_a_clean_error_and_the_proxy_serves_the_next_request(smollm2_path):
    upstream = LlamaServer(smollm2_path, slots=1).start()
    engine = ServerEngine.connect(upstream.url + "/v1", backoff=0.05)
    p = InProcessProxy(engine, policy={"method": "vanilla"})
    try:
        client = p.client()
        stream = ask(client, "Write a long story about a dragon and a knight.", max_tokens=400, stream=True)
        got = []
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                got.append(chunk)
                if len(got) == 5:
                    upstream.kill()
        assert len(got) >= 5
        assert "unreachable" in str(err.value.message)
        with pytest.raises(openai.APIStatusError) as down:  # still down: a 502 with an OpenAI-style body
            ask(client, "Hi")
        assert down.value.status_code == 502 and down.value.body["code"] == "upstream_unavailable"
        assert httpx.get(p.url + "/health").status_code == 503
        upstream.start()  # back on the same port
        r = ask(client, "What is 2 + 2?")
        assert r.choices[0].message.content and httpx.get(p.url + "/health").status_code == 200
        assert re.search(r"^codestop_requests_in_flight 0\.0$", p.metrics(), re.MULTILINE)
    finally:
        p.stop()
        upstream.kill()


def test_a_hanging_upstream_times_out_with_a_clear_error(llama):
    fault = FaultProxy(llama.url)
    engine = ServerEngine.connect(fault.url + "/v1", timeout=3.0, backoff=0.05)
    p = InProcessProxy(engine)
    try:
        assert ask(p.client(), "Hi").choices[0].message.content  # the prompt's template and tokens, cached
        fault.mode = "hang_all"  # silent: no answer to a completion or a ping (tests/test_timeouts.py: more)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as err:
                ask(p.client(), "Hi", stream=stream)
            assert err.value.status_code == 504 and "stayed silent for 3 s" in err.value.message
        fault.mode = "pass"
        assert ask(p.client(), "Hi").choices[0].message.content
    finally:
        p.stop()
        fault.server.force_exit = True
        fault.stop()


# --------------------------------------------------------------------------------------------
# Clients that leave: a slow scripted engine that counts its sessions
# --------------------------------------------------------------------------------------------

LONG = "Step. " * 3000  # far more than any test waits for


class SlowBackend(ScriptedBackend):
    def feed(self, ids) -> None:
        if self.history:  # the prompt goes in at once, each generated token takes a while
            time.sleep(0.004)
            self.engine.fed += len(ids)
        super().feed(ids)

    def close(self) -> None:
        self.engine.closed += 1


class SlowEngine(ScriptedEngine):
    """Writes ``LONG`` at ~250 tokens/s; counts sessions opened and closed, and tokens fed."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, LONG)
        self.opened = self.closed = self.fed = self.aclosed = 0

    def new_backend(self, prompt_ids):
        self.opened += 1
        return SlowBackend(self, prompt_ids)

    def counters(self):
        return {"sessions": {"opened": self.opened, "closed": self.closed}, "tokens_fed": {"": self.fed}}

    async def aclose(self) -> None:
        self.aclosed += 1


def settled(engine: SlowEngine) -> None:
    """Every session closed, and nothing is generated any more."""
    wait_for(lambda: engine.closed == engine.opened)
    fed = engine.fed
    time.sleep(0.3)
    assert engine.fed == fed, "a closed session still generates"


@pytest.fixture
def slow(tokenizer):
    engine = SlowEngine(tokenizer)
    p = InProcessProxy(engine, policy={"method": "vanilla"})
    yield engine, p
    p.stop()


def test_a_client_leaving_mid_stream_stops_its_generation_and_frees_its_session(slow):
    engine, p = slow
    body = {"model": "scripted", "messages": [{"role": "user", "content": "Go on."}], "stream": True}
    with httpx.stream("POST", p.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(12)) if line.startswith("data: ")]
    assert len(got) >= 5 and engine.opened == 1
    settled(engine)
    text = p.metrics()
    assert re.search(r'^codestop_requests_total\{endpoint="chat",status="499"\} 1\.0$', text, re.MULTILINE)
    assert re.search(r"^codestop_requests_in_flight 0\.0$", text, re.MULTILINE)
    # the engine is free for the next request
    r = ask(p.client(), "Hi", max_tokens=6, extra_body={"codestop": {"method": "budget", "budget": 4}})
    assert r.usage.codestop["reasoning_tokens"] == 4 and r.choices[0].finish_reason == "stop"
    settled(engine)


def test_a_client_leaving_a_plain_request_cancels_it(slow):
    engine, p = slow
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(p.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Go."}]}, timeout=1.0)
    settled(engine)
    assert engine.opened == 1
    text = p.metrics()
    assert re.search(r'^codestop_requests_total\{endpoint="chat",status="499"\} 1\.0$', text, re.MULTILINE)
    assert re.search(r"^codestop_requests_in_flight 0\.0$", text, re.MULTILINE)


@pytest.mark.parametrize("fault", ["response start fails", "client gone at once"])
def test_a_stream_whose_body_never_starts_still_closes_its_session(tokenizer, fault):
    """Driven at the ASGI level: the status line cannot be sent (so the body never runs), or the
    client is gone as soon as the response starts."""
    engine = SlowEngine(tokenizer)
    app = create_app(engine, ServeOptions(policy={"method": "vanilla"}))
    request = json.dumps({"messages": [{"role": "user", "content": "Go."}], "stream": True}).encode()
    sent: list[dict] = []
    pending = [{"type": "http.request", "body": request, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        if fault == "client gone at once":
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        if fault == "response start fails":
            raise OSError("connection reset by peer")
        sent.append(message)

    async def call():
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80)}
        try:
            await app(scope, receive, send)
        except OSError:
            pass

    asyncio.run(call())
    if fault == "response start fails":
        assert not sent
    settled(engine)
    assert engine.opened == 1
    metrics = app.state.served.metrics.registry
    assert metrics.get_sample_value("codestop_requests_in_flight") == 0
    assert metrics.get_sample_value("codestop_requests_total", {"endpoint": "chat", "status": "499"}) == 1


def test_engine_counters_are_exported_and_the_app_closes_its_engine_at_shutdown(slow):
    engine, p = slow
    ask(p.client(), "Hi", max_tokens=5)
    text = p.metrics()
    assert re.search(r'^codestop_sessions_total\{kind="opened"\} 1\.0$', text, re.MULTILINE)
    assert re.search(r'^codestop_sessions_total\{kind="closed"\} 1\.0$', text, re.MULTILINE)
    assert re.search(r"^codestop_tokens_fed_total [1-9]", text, re.MULTILINE)
    assert re.search(r'^codestop_stops_total\{reason="max_tokens"\} 1\.0$', text, re.MULTILINE)  # the client's cap
    assert engine.aclosed == 0
    p.stop()
    assert engine.aclosed == 1


def test_the_default_config_and_policy_apply_and_requests_override_them(tokenizer):
    engine = SlowEngine(tokenizer)
    p = InProcessProxy(engine, config=DEFAULT_CONFIG.replace(max_reasoning_tokens=7), policy={"method": "budget", "budget": 5})
    try:
        client = p.client()
        cs = ask(client, "Hi", max_tokens=None).usage.codestop
        assert cs["reasoning_tokens"] == 5 and cs["policy"] == {"method": "budget", "budget": 5}
        cs = ask(client, "Hi", max_tokens=None, extra_body={"codestop": {"budget": 6}}).usage.codestop
        assert cs["reasoning_tokens"] == 6 and cs["stop_reason"] == "budget"
        r = ask(client, "Hi", max_tokens=None, extra_body={"codestop": {"method": "vanilla"}})
        assert r.usage.codestop["reasoning_tokens"] == 7 and r.choices[0].finish_reason == "length"
        r = ask(client, "Hi", max_tokens=3, extra_body={"codestop": {"method": "vanilla"}})
        assert r.usage.codestop["reasoning_tokens"] == 3 and r.usage.codestop["stop_reason"] == "max_tokens"
        r = ask(client, "Hi", max_tokens=3, extra_body={"codestop": {"method": "vanilla", "max_reasoning_tokens": 2}})
        assert r.usage.codestop["reasoning_tokens"] == 2  # codestop's own field over OpenAI's
    finally:
        p.stop()
    with pytest.raises(CodestopError, match="tau"):
        ServeOptions(policy={"method": "codestop", "tau": -1})


# --------------------------------------------------------------------------------------------
# What the client sent, honoured to the letter: a scripted engine that writes "Step. Step. ..."
# and answers "5}" after a "\\boxed{"
# --------------------------------------------------------------------------------------------


def test_the_client_messages_are_rendered_exactly_as_sent(tokenizer):
    engine = SlowEngine(tokenizer)
    defaults = server_defaults(DEFAULT_CONFIG, {"method": "vanilla"}, None)

    def prepared(body, chat=True):
        return asyncio.run(prepare(parse_request(body, chat), engine, defaults))

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prep = prepared({"messages": messages})
    assert prep.prompt == template  # no instruction appended, no system prompt added
    think = prepared({"messages": messages, "codestop": {"family": "think"}})
    assert think.prompt == template + "<think>\n"  # the thinking block opened for the model, nothing else
    raw = prepared({"prompt": "Once upon"}, chat=False)
    assert raw.prompt == "Once upon" and raw.config.answer == "none" and prep.config.answer == "free"


def test_stop_max_tokens_and_answer_modes_are_honoured(slow):
    _engine, p = slow
    client = p.client()
    # a client stop string ends the output before it, streaming or not, chat or completion
    r = ask(client, "Go.", stop=".", max_tokens=20, extra_body={"codestop": {"method": "vanilla"}})
    assert r.choices[0].message.content == "Step" and r.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in ask(client, "Go.", stop=["zz", " Step."], max_tokens=20, stream=True,
                                                                   extra_body={"codestop": {"method": "vanilla"}}) if c.choices) == "Step."
    c = client.completions.create(model="scripted", prompt="Go.", max_tokens=20, stop=["p. S"], extra_body={"codestop": {"method": "vanilla"}})
    assert c.choices[0].text == "Ste" and c.choices[0].finish_reason == "stop"
    # a raw completion stopped by its policy just ends: nothing appended
    c = client.completions.create(model="scripted", prompt="Go.", max_tokens=20, extra_body={"codestop": {"method": "budget", "budget": 4}})
    assert c.choices[0].text == "Step. Step." and c.usage.completion_tokens == 4 and c.usage.codestop["answer_tokens"] == 0
    # the paper's forced answer, per request, within max_tokens: reasoning + answer <= max_tokens
    boxed = ask(client, "Go.", max_tokens=6, extra_body={"codestop": {"method": "budget", "budget": 4, "answer": "boxed"}})
    assert boxed.choices[0].message.content == "Step. Step.\n\n**Final Answer**\n\nThe final answer is \\boxed{5}"
    assert boxed.usage.completion_tokens == 6 and boxed.usage.codestop["answer"] == "5"
    cut = ask(client, "Go.", max_tokens=5, extra_body={"codestop": {"method": "budget", "budget": 4, "answer": "boxed"}})
    assert cut.usage.completion_tokens == 5 and cut.choices[0].finish_reason == "length"
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Go."}], **{field: 3})
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_a_raw_completion_ends_at_its_stop_under_a_thinking_family_too(tokenizer):
    """A raw completion has no thinking block: a thinking family's reasoning is its text, which the
    client's stop string ends, streaming or not, in one request or in probed steps."""
    p = InProcessProxy(ScriptedEngine(tokenizer, "Step one. Step two. Step three."))
    try:
        client = p.client()
        probed = {"method": "deer", "threshold": 1.0, "probe_interval": 1, "boundaries": ["Step"]}  # probes, never stops
        for codestop in ({"family": "think", "method": "vanilla"}, {"family": "think", **probed}):
            kw = {"model": "scripted", "prompt": "Go.", "max_tokens": 30, "stop": ["three"], "extra_body": {"codestop": codestop}}
            c = client.completions.create(**kw)
            assert c.choices[0].text == "Step one. Step two. Step " and c.choices[0].finish_reason == "stop", codestop
            assert c.usage.codestop["probes"] == (1 if "threshold" in codestop else 0)
            chunks = [ch for ch in client.completions.create(**kw, stream=True) if ch.choices]
            assert "".join(ch.choices[0].text for ch in chunks) == "Step one. Step two. Step " and chunks[-1].choices[0].finish_reason == "stop"
        # a chat answer's thinking is kept apart: the stop ends the answer, not the reasoning
        r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Go."}], max_tokens=30,
                                           stop=["three"], extra_body={"codestop": {"family": "think", "method": "vanilla"}})
        assert r.choices[0].message.model_extra["reasoning_content"] == "Step one. Step two. Step three."
    finally:
        p.stop()


def test_harmless_fields_are_accepted_and_every_error_has_the_openai_shape(slow):
    _engine, p = slow
    harmless = {"user": "u1", "presence_penalty": 0, "frequency_penalty": 0.0, "n": 1, "logprobs": False, "top_logprobs": 0,
                "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "stream_options": {"include_usage": False},
                "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True, "seed": 3, "top_p": 1.0}
    body = {"model": "scripted", "messages": [{"role": "user", "content": "Go."}], "max_tokens": 3, **harmless}
    r = httpx.post(p.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "scripted" and "usage" in r.json()
    for method, path, status, code in (("GET", "/v1/nothing", 404, "not_found"), ("POST", "/nothing", 404, "not_found"),
                                       ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
                                       ("DELETE", "/v1/models", 405, "method_not_allowed")):
        r = httpx.request(method, p.url + path)
        assert r.status_code == status and r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                                                  "param": None, "code": code}}, (method, path, r.text)
        assert path in r.json()["error"]["message"]
    r = httpx.post(p.url + "/v1/completions", json={"model": "gpt-4o", "prompt": "Hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


# --------------------------------------------------------------------------------------------
# Starting: the engine built in the background, an upstream that comes up after the proxy
# --------------------------------------------------------------------------------------------


def test_health_is_503_until_the_engine_is_built_and_requests_say_why(tokenizer):
    release = threading.Event()

    def load():  # an in-process model loading
        assert release.wait(30)
        return SlowEngine(tokenizer)

    p = InProcessProxy(load, policy={"method": "vanilla"})
    try:
        health = httpx.get(p.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        with pytest.raises(openai.APIStatusError) as err:
            ask(p.client(), "Go.", max_tokens=3)
        assert err.value.status_code == 503 and err.value.body["code"] == "model_loading"
        release.set()
        wait_for(lambda: httpx.get(p.url + "/health").status_code == 200)
        assert ask(p.client(), "Go.", max_tokens=3).usage.completion_tokens == 3
    finally:
        release.set()
        p.stop()

    def fail():
        raise CodestopError("model: 'nope' does not exist")

    p = InProcessProxy(fail)
    try:
        wait_for(lambda: httpx.get(p.url + "/health").json()["status"] == "failed")
        assert httpx.get(p.url + "/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as err:
            ask(p.client(), "Go.")
        assert err.value.status_code == 503 and "nope" in err.value.message
    finally:
        p.stop()


def test_the_proxy_starts_before_its_upstream_and_serves_once_it_is_up(smollm2_path):
    """`codestop serve` against a port where nothing listens yet: it starts, /health and requests
    are 503, the proxy key comes from the environment; then the upstream comes up and it serves."""
    upstream = LlamaServer(smollm2_path, slots=1)
    port = free_port()
    env = {**os.environ, "CODESTOP_PROXY_API_KEY": "k3y"}
    cmd = [sys.executable, "-m", "codestop.cli", "serve", "--base-url", upstream.url + "/v1", "--port", str(port),
           "--log-level", "warning", "--method", "vanilla"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        def health() -> int:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                return httpx.get(url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                return 0

        keyed = {"authorization": "Bearer k3y"}  # /health's details are for the key's holders
        wait_for(lambda: health() == 503 and httpx.get(url + "/health", headers=keyed).json().get("upstream") == "starting", timeout=60)
        assert httpx.get(url + "/health").json() == {"status": "degraded"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, "Hi")
        assert err.value.status_code == 503 and err.value.body["code"] == "upstream_not_ready"
        assert "not ready" in err.value.message
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0), "Hi")
        upstream.start()
        wait_for(lambda: health() == 200, timeout=60)
        r = ask(client, "What is 2 + 2?", max_tokens=6)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 6
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        upstream.kill()


# --------------------------------------------------------------------------------------------
# Load and leaks: the real CLI verb in a subprocess
# --------------------------------------------------------------------------------------------


@contextmanager
def cli_proxy(base_url: str, *flags: str):
    """The real ``codestop serve`` verb in a subprocess in front of ``base_url``, once healthy: (process, URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "codestop.cli", "serve", "--base-url", base_url, "--port", str(port), "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _proxy_sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _round(base_url: str, body: dict, clients: int = 16, per_client: int = 2) -> tuple[list, float]:
    async def one_client() -> list:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as c:
            out = []
            for _ in range(per_client):
                try:
                    out.append(await c.chat.completions.create(**body))
                except Exception as err:  # noqa: BLE001 - counted as a failure
                    out.append(err)
            return out

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client() for _ in range(clients)))
    return [r for rs in results for r in rs], time.perf_counter() - t0


def test_load_16_clients_x_2_requests_without_failures_or_leaks(llama):
    with cli_proxy(llama.url + "/v1", "--probe-interval", "6", "--boundaries", "\\n") as (proc, url):
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]  # the upstream's
        questions = {"model": model, "messages": [{"role": "user", "content": "Name three colours, one per line."}], "max_tokens": SHORT, "temperature": 0}
        sockets0 = _proxy_sockets(proc.pid)
        warm, warm_s = asyncio.run(_round(url + "/v1", questions))
        sockets1, rss1 = _proxy_sockets(proc.pid), _rss(proc.pid)
        second, second_s = asyncio.run(_round(url + "/v1", questions))
        sockets2, rss2 = _proxy_sockets(proc.pid), _rss(proc.pid)
        for results in (warm, second):
            failures = [r for r in results if isinstance(r, Exception)]
            assert not failures, failures[:3]
            assert len(results) == 32
            for r in results:  # complete: a finish reason, the forced or own answer, codestop's figures
                # the answers differ with what shares llama.cpp's batch (16 clients on 4 slots: a probe's
                # prefill can change a later greedy token, docs/serving.md), so each finish reason is
                # checked against its own answer: "length" exactly when the answer took every token
                finish = "length" if r.usage.completion_tokens == SHORT else "stop"
                assert r.choices[0].finish_reason == finish and r.choices[0].message.content
                assert r.usage.codestop["stop_reason"] and r.usage.completion_tokens >= 1
        probes = sum(r.usage.codestop["probes"] for r in second)
        # no leaks: the second round leaves the sockets about where the first left them. The pool of
        # keep-alive connections to the upstream grows to the round's peak concurrency (at most 16
        # requests in flight; seen: 13 after one round, 16 after the next), while a leak would add
        # one per request, 32 a round. Memory within 10%.
        assert sockets2 <= sockets1 + 8, (sockets0, sockets1, sockets2)
        assert abs(rss2 - rss1) <= 0.10 * rss1, (rss1, rss2)
        assert re.search(r"^codestop_requests_in_flight 0\.0$", httpx.get(url + "/metrics").text, re.MULTILINE)
        # the same vanilla requests through the proxy and straight to the upstream
        vanilla = dict(questions, extra_body=None)
        vanilla.pop("extra_body")
        via, via_s = asyncio.run(_round(url + "/v1", dict(vanilla, extra_body={"codestop": {"method": "vanilla"}})))
        direct, direct_s = asyncio.run(_round(llama.url + "/v1", vanilla))
        assert not [r for r in via + direct if isinstance(r, Exception)]
        tok_via = sum(r.usage.completion_tokens for r in via)
        tok_direct = sum(r.usage.completion_tokens for r in direct)
        print(
            f"\nload 16x2: codestop round 1 {warm_s:.1f} s, round 2 {second_s:.1f} s ({probes} probes), 0 failures; "
            f"sockets {sockets0}->{sockets1}->{sockets2}; RSS {rss1 / 2**20:.1f}->{rss2 / 2**20:.1f} MiB; "
            f"vanilla via proxy {32 / via_s:.2f} req/s {tok_via / via_s:.1f} tok/s, "
            f"direct {32 / direct_s:.2f} req/s {tok_direct / direct_s:.1f} tok/s"
        )


def _in_flight(url: str) -> float:
    return scrape(url, "codestop_requests_in_flight")


def test_clients_leaving_free_every_slot_and_concurrent_streams_never_mix(llama):
    """The bad-input battery's survivors, kept: 20 clients that leave after their first chunk leave
    nothing in flight, in the proxy or upstream; then 32 concurrent streams, half cancelled after
    their first chunk, three rounds: no 5xx, each stream its own, no growth in sockets or memory."""
    busy = "llamacpp:requests_processing"
    with cli_proxy(llama.url + "/v1", "--method", "vanilla") as (proc, url):
        body = {"messages": [{"role": "user", "content": POEM}], "max_tokens": 12, "stream": True}  # short: the slots are the point
        for _ in range(20):
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                assert next(line for line in r.iter_lines() if line.startswith("data: "))
        wait_for(lambda: _in_flight(url) == 0 and scrape(llama.url, busy) == 0, timeout=30)

        async def one(client: httpx.AsyncClient, leaves: bool) -> tuple[int, set[str], bool]:
            ids, done = set(), False
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        ids.add(json.loads(line[6:]).get("id"))
                        if leaves:
                            break
            return r.status_code, ids, done

        async def round_() -> list[tuple[int, set[str], bool]]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                return await asyncio.gather(*(one(client, leaves=i % 2 == 1) for i in range(32)))

        seen: list[tuple[int, int]] = []
        for _ in range(3):
            streams = asyncio.run(round_())
            assert [status for status, _, _ in streams] == [200] * 32
            assert all(len(ids) == 1 for _, ids, _ in streams), streams  # one answer per stream, none mixed in
            assert len({next(iter(ids)) for _, ids, _ in streams}) == 32
            assert all(done for i, (_, _, done) in enumerate(streams) if i % 2 == 0)  # the ones that stayed got to the end
            wait_for(lambda: _in_flight(url) == 0 and scrape(llama.url, busy) == 0, timeout=30)
            seen.append((_proxy_sockets(proc.pid), _rss(proc.pid)))
        (sockets1, rss1), _, (sockets3, rss3) = seen
        assert sockets3 <= sockets1 + 8 and rss3 <= 1.10 * rss1, seen
        assert not re.search(r'^codestop_requests_total\{endpoint="chat",status="5\d\d"\}', httpx.get(url + "/metrics").text, re.MULTILINE)


# --------------------------------------------------------------------------------------------
# A budget that ends inside a multi-byte character
# --------------------------------------------------------------------------------------------


EMOJIS = "Emojis: 🎉🎉🎉🎉 and"  # SmolLM2 goes on with an emoji of three tokens: 1 or 2 end inside it


@pytest.mark.parametrize("max_tokens", [1, 2, 3])
def test_a_budget_ending_inside_a_multibyte_character_is_an_answer(proxy, llama, max_tokens):
    """llama-server withholds the tokens of an unfinished UTF-8 character: with the budget ending
    inside one, its answer holds no token, finish ``length``. That is the answer (200, ``length``),
    not a server making no progress (a 502 before); what text there is, is the upstream's own."""
    whole = httpx.post(llama.url + "/v1/completions", json={"prompt": EMOJIS, "max_tokens": 3, "temperature": 0},
                       timeout=60).json()["choices"][0]["text"]
    assert whole.strip() and "\ufffd" not in whole  # the character the three tokens make
    r = httpx.post(proxy.url + "/v1/completions", json={"prompt": EMOJIS, "max_tokens": max_tokens, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and whole.startswith(choice["text"]) and "\ufffd" not in choice["text"], choice
    chat = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": EMOJIS}],
                                                               "max_tokens": max_tokens, "temperature": 0}, timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "length", chat.text
