"""One routing key on every upstream request of a client request (``--router``,
``--routing-key-header``; codestop.engines.server.routing), on a scripted vLLM-dialect upstream
(``httpx.MockTransport``) that records each request's headers: the reasoning stream, probes, the
answer, the agents' chat answer and the guard's audits all carry the same key, unique to the client
request; a client's own session header or ``user`` is kept; llm-d's handed-back token is sent back;
nonsense values are one clear error. The same through a real vllm-router and two real vLLM replicas:
tests/test_router_vllm.py."""

from __future__ import annotations

import json
import math
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from harness import InProcessProxy, binary, free_port, serve_in_thread, wait_for
from scripted import toy_tokenizer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from codestop.cli import build_parser
from codestop.cli.serve import serve_options
from codestop.engines.server import ServerEngine
from codestop.engines.server.launch import ServerProcess
from codestop.errors import ParameterError

SCRIPT = "Step one\n\nStep two\n\nStep three\n\nStep four\n\nSo plus two\n\n</think>\n\nThe answer is 5."
ANSWER = "5}"
ASK = [{"role": "user", "content": "What is two plus three?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]


class RecordingVllm:
    """A vLLM-dialect upstream writing ``SCRIPT`` after the assistant's turn opens and ``ANSWER``
    after any box (a probe, the answer), every token certain; it records each request's path and
    headers. ``hand_back``: a header it answers with (llm-d's session token)."""

    def __init__(self, hand_back: dict[str, str] | None = None) -> None:
        self.tok = toy_tokenizer()
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.hand_back = hand_back or {}
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "toy", "owned_by": "vllm", "max_model_len": 4096}]})
        with self.lock:
            self.seen.append((path, dict(request.headers)))
        body = json.loads(request.content)
        if path == "/v1/chat/completions":
            message = {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}
            return httpx.Response(200, headers=self.hand_back, json={
                "id": "chatcmpl-up", "object": "chat.completion", "model": "toy", "created": 0,
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        prompt = body["prompt"]  # token ids; text where a router takes no ids (SGLang's gateway)
        out = self.generate(prompt if isinstance(prompt, str) else self.tok.decode(prompt), body["max_tokens"], body.get("stop") or [])
        matched = next((s for s in body.get("stop") or [] if s in self.tok.decode(out)), None)
        finish = "stop" if matched or out[-1:] == [0] else "length"
        choices = [self.choice(body, out[i:i + 1], finish if i == len(out) - 1 else None, matched) for i in range(len(out))]
        if body.get("stream"):
            sse = "".join(f"data: {json.dumps({'object': 'text_completion', 'choices': [c]})}\n\n" for c in choices)
            return httpx.Response(200, headers={**self.hand_back, "content-type": "text/event-stream"},
                                  content=(sse + "data: [DONE]\n\n").encode())
        return httpx.Response(200, headers=self.hand_back, json={"object": "text_completion", "model": "toy",
                                                                 "choices": [self.choice(body, out, finish, matched)]})

    def generate(self, prompt: str, n: int, stops: list[str]) -> list[int]:
        written = prompt.rsplit("<|im_start|>assistant\n", 1)[-1].removeprefix("<think>\n")
        if "{" in written:  # a probe, or a forced answer
            rest = ANSWER
        elif "</think>" in written:  # the answer after a stop
            rest = "The answer is 5."
        else:
            rest = SCRIPT[len(written):] if SCRIPT.startswith(written) else ""
        out: list[int] = []
        for t in self.tok.encode(rest + "<|im_end|>")[:n]:
            out.append(t)
            if t == 0 or any(s in self.tok.decode(out) for s in stops):
                break
        return out

    def choice(self, body: dict, out: list[int], finish: str | None, matched: str | None) -> dict:
        """As vLLM answers: log-probabilities only when asked, token ids with ``return_token_ids``."""
        c: dict = {"index": 0, "text": self.tok.decode([t for t in out if t]), "finish_reason": finish,
                   "stop_reason": matched if finish else None}
        if body.get("logprobs") is not None:
            c["logprobs"] = {"tokens": [f"token_id:{t}" for t in out], "token_logprobs": [math.log(0.999)] * len(out)}
        if body.get("return_token_ids"):
            c["token_ids"] = out
        return c

    def keys(self, header: str) -> list[str | None]:
        with self.lock:
            return [h.get(header) for _, h in self.seen]


def proxy(up: RecordingVllm, **options) -> InProcessProxy:
    engine = ServerEngine.connect("http://up/v1", tokenizer=up.tok, transport=httpx.MockTransport(up), backoff=0.0)
    return InProcessProxy(engine, **options)


def post(p: InProcessProxy, body: dict, headers: dict | None = None) -> httpx.Response:
    body = {"messages": ASK, "max_tokens": 96, "codestop": {"family": "think", "probe_interval": 1}, **body}
    r = httpx.post(p.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r


def test_every_upstream_request_of_a_client_request_carries_its_one_key():
    up = RecordingVllm()
    p = proxy(up, router="vllm-router")
    try:
        kinds = p.app.state.served.engine.transport.stats.by_kind
        for body in ({}, {"stream": True}):
            before = len(up.seen)
            post(p, body)
            keys = up.keys("x-session-id")[before:]
            assert len(keys) >= 3 and keys[0] and set(keys) == {keys[0]}, keys  # one key on all of them
        assert {"step", "probe", "answer"} <= set(kinds), kinds  # the reasoning, probes and the answer were sent
        first, second = up.keys("x-session-id")[0], up.keys("x-session-id")[-1]
        assert first != second  # unique to each client request
        before = len(up.seen)
        post(p, {"tools": TOOLS})  # an agent's request: its answer phase goes to the upstream's chat
        assert [path for path, _ in up.seen[before:]][-1] == "/v1/chat/completions"
        keys = up.keys("x-session-id")[before:]
        assert keys[0] and set(keys) == {keys[0]} and keys[0] not in (first, second), keys
    finally:
        p.stop()


def test_a_clients_own_session_header_or_user_is_the_key_and_routing_off_sends_none():
    up = RecordingVllm()
    p = proxy(up, router="sglang", routing_key_header=["X-Conversation"])
    try:
        post(p, {}, headers={"x-conversation": "conv-42"})
        post(p, {"stream": True}, headers={"X-SMG-Routing-Key": "conv-42"})
        assert set(up.keys("x-smg-routing-key")) == set(up.keys("x-conversation")) == {"conv-42"}  # both turns, one replica
        before = len(up.seen)
        post(p, {"user": "alice"})
        assert set(up.keys("x-smg-routing-key")[before:]) == {"alice"}
        before = len(up.seen)
        post(p, {"user": "\u00e9l\u00e8ve " * 80})  # not a header value: hashed, the same every time
        post(p, {"user": "\u00e9l\u00e8ve " * 80})
        hashed = set(up.keys("x-smg-routing-key")[before:])
        assert len(hashed) == 1 and len(hashed.pop()) == 64
    finally:
        p.stop()
    up = RecordingVllm()
    p = proxy(up)  # no router named: nothing added
    try:
        post(p, {}, headers={"x-session-id": "mine"})
        assert not any(k.startswith(("x-session", "x-smg", "x-dynamo")) for _, h in up.seen for k in h)
    finally:
        p.stop()


def test_llm_d_gets_back_the_token_its_scheduler_handed_out():
    up = RecordingVllm(hand_back={"x-session-token": "ZGVmYXVsdC9wb2QtYQ==", "set-cookie": "llm-d-session=ZGVmYXVsdC9wb2QtYQ==; Path=/"})
    p = proxy(up, router="llm-d")
    try:
        post(p, {"stream": True})
        tokens, cookies = up.keys("x-session-token"), up.keys("cookie")
        assert tokens[0] is None and len(tokens) >= 3  # the first request is placed by the scheduler
        assert set(tokens[1:]) == {"ZGVmYXVsdC9wb2QtYQ=="} and set(cookies[1:]) == {"llm-d-session=ZGVmYXVsdC9wb2QtYQ=="}
        up.hand_back = {}
        before = len(up.seen)
        post(p, {}, headers={"cookie": "theme=dark; llm-d-session=cG9kLWI="})  # the client's own session: kept
        assert set(up.keys("cookie")[before:]) == {"llm-d-session=cG9kLWI="}
    finally:
        p.stop()


def test_audits_carry_the_key_of_the_request_they_audit():
    up = RecordingVllm()
    p = proxy(up, router="dynamo", audit_fraction=1.0, max_risk=0.2, alpha=0.1)
    try:
        r = post(p, {})
        assert r.json()["usage"]["codestop"]["stopped_early"], r.json()  # so it is audited: continued past its stop
        # the audit may be done before the reply is read here (it starts once the response is sent)
        wait_for(lambda: p.app.state.served.engine.transport.stats.by_kind.get("step", 0) >= 2)
        wait_for(lambda: not p.app.state.served.guard.auditor.busy)
        keys = up.keys("x-dynamo-session-id")
        counts = p.app.state.served.engine.transport.stats.by_kind
        assert counts.get("step", 0) >= 2, counts  # the served reasoning, then the audit's continuation
        assert keys[0] and set(keys) == {keys[0]}, keys
    finally:
        p.stop()


@pytest.mark.parametrize("args, message", [
    (["--router", "nginx"], "router: 'nginx' must be one of vllm-router, sglang, dynamo, llm-d, production-stack"),
    (["--router", "production-stack"], "--routing-key-header NAME"),
    (["--routing-key-header", "x session"], "routing_key_header: 'x session' must be an HTTP header name"),
    (["--routing-key-header", "Authorization"], "is a header the proxy sets itself"),
])
def test_nonsense_routing_flags_are_one_clear_error(args, message):
    parsed = build_parser().parse_args(["serve", "--base-url", "http://up/v1", *args])
    with pytest.raises(ParameterError) as err:
        serve_options(parsed)
    assert message in str(err.value)
    assert str(err.value).count("\n") == 0


def test_the_flags_and_their_worker_form():
    parsed = build_parser().parse_args(["serve", "--base-url", "http://up/v1", "--router", "production-stack",
                                        "--routing-key-header", "x-user-id", "--routing-key-header", "X-Tenant"])
    options = serve_options(parsed)
    assert options.routing.headers == ("x-user-id", "x-tenant")
    assert type(options).from_dict(json.loads(json.dumps(options.to_dict()))).routing == options.routing


# --------------------------------------------------------------------------------------------
# Through real routers (vllm-router and SGLang's gateway: prebuilt binaries from PyPI, the test extra's) in front of two
# scripted workers on real sockets: seconds, no model. The same with real vLLM replicas and their
# prefix caches: tests/test_router_vllm.py (slow).
# --------------------------------------------------------------------------------------------


def worker_app(up: RecordingVllm) -> Starlette:
    async def handle(request: Request) -> Response:
        if request.url.path == "/health":
            return Response("{}", media_type="application/json")
        answer = up(httpx.Request(request.method, str(request.url), headers=request.headers.raw, content=await request.body()))
        return Response(answer.content, answer.status_code, headers={k: v for k, v in answer.headers.items() if k != "content-length"})

    return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])


# each router as started in front of the workers, and the --router that names it
ROUTER_COMMANDS = {
    "vllm-router": ["vllm-router", "--policy", "consistent_hash", "--worker-startup-check-interval", "1", "--log-level", "warning"],
    "sglang": ["smg", "launch", "--policy", "manual", "--log-level", "warn"],  # sglang-router's gateway; 0.3.2 has no consistent_hashing yet
}


@pytest.fixture(scope="module", params=list(ROUTER_COMMANDS))
def scripted_router(request):
    """A real router in front of two scripted vLLM-dialect workers: (its --router name, its URL, the workers)."""
    workers = [RecordingVllm(), RecordingVllm()]
    servers = []
    for w in workers:
        port = free_port()
        servers.append((serve_in_thread(worker_app(w), port), port))
    name, port = request.param, free_port()
    command, *flags = ROUTER_COMMANDS[name]
    log = Path(tempfile.mkstemp(prefix=f"codestop-{command}-", suffix=".log")[1])
    router = ServerProcess([binary(command), *flags, "--host", "127.0.0.1", "--port", str(port),
                            "--worker-urls", *(f"http://127.0.0.1:{p}" for _, p in servers)], port, log, name=command)
    router.start(60)
    yield name, f"http://127.0.0.1:{port}", workers
    router.stop()
    for (server, thread), _ in servers:
        server.should_exit = True
        thread.join(timeout=10)


def per_worker(p: InProcessProxy, workers: list[RecordingVllm], n: int) -> list[list[int]]:
    """Ask ``n`` questions one after another: the upstream requests each worker got for each."""
    out = []
    for i in range(n):
        before = [len(w.seen) for w in workers]
        # CoDE-Stop set never to stop: a probe at each of the script's steps; questions of different lengths
        never = {"family": "think", "probe_interval": 1, "variant": "reference", "r_min": 1, "r_max": 1, "tau": 1000}
        post(p, {"messages": [{"role": "user", "content": "What is" + " very" * i + " big?"}], "stream": i % 2 == 1, "codestop": never})
        out.append([len(w.seen) - b for w, b in zip(workers, before)])
    return out


def test_through_a_real_router_the_key_keeps_a_question_on_one_worker_and_without_it_they_scatter(scripted_router):
    name, url, workers = scripted_router
    keyed = InProcessProxy(ServerEngine.connect(url + "/v1", tokenizer=workers[0].tok, backoff=0.0), router=name)
    plain = InProcessProxy(ServerEngine.connect(url + "/v1", tokenizer=workers[0].tok, backoff=0.0))
    try:
        together = per_worker(keyed, workers, 6)
        assert all(min(n) == 0 and max(n) >= 6 for n in together), together  # every request of a question on one worker
        apart = per_worker(plain, workers, 6)
        assert sum(min(n) > 0 for n in apart) >= 3, apart  # the router hashes each request alone: they scatter
    finally:
        keyed.stop()
        plain.stop()
