"""Several replicas behind one engine (``--base-url`` twice): session affinity, least-in-flight
spreading, failover and rejoining. First on scripted upstreams (``httpx.MockTransport``: fast,
the selection and its bookkeeping), then on two REAL llama.cpp servers (tests/llama_servers.py)
serving SmolLM2-135M, one of them killed mid-run and started again."""

from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import aclosing

import httpx
import pytest
from harness import scrape
from llama_servers import LlamaServer
from scripted import ToyTokenizer

from codestop.cli import build_parser, engine_options_from_args
from codestop.config import GenerationConfig
from codestop.controller import Result, agenerate, astream
from codestop.engines.replicas import ReplicaEngine
from codestop.engines.server import HFTokens, ServerEngine, ServerOptions, Upstream, dialect_for
from codestop.errors import CodestopError, ServerError, ServerUnreachable
from codestop.models import load_engine
from codestop.policies import make_policy
from codestop.sampling import Sampling
from codestop.serve import Metrics, ServeOptions, create_app
from codestop.steps import StepRules

# --------------------------------------------------------------------------------------------
# Scripted upstreams: what is picked, counted, taken out and brought back
# --------------------------------------------------------------------------------------------


class Upstreams:
    """Scripted vLLM-dialect servers by host: each answers every completion with EOS; a host in
    ``down`` refuses connections; ``models`` overrides the model a host serves."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.models: dict[str, str] = {}
        self.completions: dict[str, int] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("refused")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": self.models.get(host, "m"), "owned_by": "vllm"}]})
        self.completions[host] = self.completions.get(host, 0) + 1
        answer = {"choices": [{"index": 0, "text": "", "finish_reason": "stop", "stop_reason": None,
                               "logprobs": {"tokens": ["token_id:0"], "token_logprobs": [-0.1]}}]}
        if json.loads(request.content).get("stream"):  # a step with no boundary (to the end) is streamed
            return httpx.Response(200, text=f"data: {json.dumps(answer)}\n\ndata: [DONE]\n\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=answer)

    def engine(self, host: str) -> ServerEngine:
        return ServerEngine(f"http://{host}", Upstream("m", dialect_for("vllm"), HFTokens(ToyTokenizer(), "toy"), eos=frozenset({0})),
                            ServerOptions(retries=0, backoff=0.0, transport=httpx.MockTransport(self.handler)))


def run(coro):
    return asyncio.run(coro)


def test_sessions_go_to_the_least_busy_replica_and_free_it_on_close():
    up = Upstreams()
    eng = ReplicaEngine([up.engine(h) for h in ("a", "b", "c")])

    async def go():
        s = [await eng.start([1, 2], Sampling()) for _ in range(4)]
        assert [x.replica.url for x in s] == ["http://a", "http://b", "http://c", "http://a"]  # ties: the first
        await s[1].close()
        await s[1].close()  # closing twice frees the place once
        s.append(await eng.start([1, 2], Sampling()))
        assert s[-1].replica.url == "http://b" and [r.in_flight for r in eng.replicas] == [2, 1, 1]
        assert (await s[0].step(4, StepRules())).end == "eos" and s[0].ids == [1, 2]  # attributes pass through
        for x in s:
            await x.close()
        assert [r.in_flight for r in eng.replicas] == [0, 0, 0] and [r.sessions for r in eng.replicas] == [2, 2, 1]
        await eng.aclose()

    run(go())
    assert up.completions == {"a": 1}


def test_a_failed_replica_leaves_rotation_until_its_health_check_passes():
    up = Upstreams()
    eng = ReplicaEngine([up.engine("a"), up.engine("b")], recheck_s=0.0)

    async def go():
        sa = await eng.start([1], Sampling())
        up.down.add("a")
        with pytest.raises(ServerUnreachable, match="http://a"):  # its own error, as with one server
            await sa.step(4, StepRules())
        await sa.close()
        assert [r.healthy for r in eng.replicas] == [False, True] and eng.replicas[0].failures == 1
        assert (await eng.start([1], Sampling())).replica.url == "http://b"
        assert eng.tokenize("hi") == ToyTokenizer().encode("hi")
        up.down.add("b")
        health = await eng.health()
        assert (health["ok"], health["upstream"]) == (False, "unreachable")
        with pytest.raises(ServerError, match=r"none of the 2 completions servers .*http://a: .*http://b: ") as caught:
            await eng.start([1], Sampling())
        assert caught.value.status == 503
        up.down.clear()
        await eng.ready()  # none healthy: checked inline, both back
        health = await eng.health()
        json.dumps(health)
        assert health["upstream"] == "ok" and [r["healthy"] for r in health["replicas"]] == [True, True]
        assert health["replicas"][0]["last_error"] and health["replicas"][1]["in_flight"] == 1
        await eng.aclose()

    run(go())


def test_counters_carry_a_replica_label_in_prometheus():
    up = Upstreams()
    eng = ReplicaEngine([up.engine("a"), up.engine("b")])

    async def go():
        s = await eng.start([1], Sampling())
        await s.step(4, StepRules())
        await s.close()
        await eng.aclose()

    run(go())
    metrics = Metrics(lambda: eng)
    text = metrics.render().decode()
    assert 'codestop_upstream_requests_total{kind="step",replica="http://a"} 1.0' in text
    assert 'codestop_upstream_retries_total{replica="http://b"} 0.0' in text
    assert 'codestop_replica_sessions_total{replica="http://a"} 1.0' in text


def test_the_flag_repeats_one_url_is_a_server_engine_and_replicas_must_serve_one_model():
    args = build_parser().parse_args(["run", "q", "--base-url", "http://a/v1", "--base-url", "http://b/v1"])
    assert engine_options_from_args(args)["base_url"] == ["http://a/v1", "http://b/v1"]
    up = Upstreams()
    options = {"tokenizer": ToyTokenizer(), "transport": httpx.MockTransport(up.handler)}
    one = load_engine(None, base_url=["http://a/v1"], **options)
    assert type(one) is ServerEngine
    two = load_engine(None, base_url=["http://a/v1", "http://b/v1"], **options)
    assert isinstance(two, ReplicaEngine) and two.model_name == "m"
    up.down.add("b")  # a replica down at connect joins later; all down is an error at once
    assert [r.healthy for r in load_engine(None, base_url=["http://a", "http://b"], **options).replicas] == [True, False]
    up.down.add("a")
    with pytest.raises(ServerUnreachable, match="none of the 2 replicas can be reached: .*http://a.*http://b"):
        load_engine(None, base_url=["http://a", "http://b"], **options)
    up.down.clear()
    up.models["b"] = "other"
    with pytest.raises(CodestopError, match="http://b serves 'other' but http://a serves 'm'"):
        load_engine(None, base_url=["http://a", "http://b"], **options)
    with pytest.raises(CodestopError, match="http://a given more than once"):
        load_engine(None, base_url=["http://a/v1", "http://a"], **options)


def test_replicas_not_up_yet_join_when_they_answer(monkeypatch):
    """``codestop serve`` does not wait for its upstreams: 503 "starting" until one answers."""
    monkeypatch.setattr("codestop.engines.server.engine.RECONNECT_INTERVAL_S", 0.0)
    up = Upstreams()
    up.down.update({"a", "b"})
    eng = load_engine(None, base_url=["http://a", "http://b"], wait=False, recheck_s=0.0, tokenizer=ToyTokenizer(),
                      transport=httpx.MockTransport(up.handler))
    assert run(eng.health())["upstream"] == "starting"
    with pytest.raises(ServerError, match="none of the 2 completions servers is available") as caught:
        eng.tokenize("hi")
    assert caught.value.status == 503
    up.down.discard("b")
    run(eng.ready())
    assert [r.healthy for r in eng.replicas] == [False, True] and eng.model_name == "m"
    assert eng.tokenize("hi") == ToyTokenizer().encode("hi") and eng.model_info()["name"] == "m"


# --------------------------------------------------------------------------------------------
# Two real llama.cpp servers
# --------------------------------------------------------------------------------------------

NEVER_STOPS = make_policy("codestop", r_min=1.0, r_max=1.0, tau=1e9)  # probes at every step, never stops early
CONFIG = GenerationConfig(max_reasoning_tokens=40, probe_interval=8, boundaries=("\n",), temperature=0.0)
POEM = "Write a poem about the sea, twelve lines."


@pytest.fixture(scope="module")
def pair(smollm2_path):
    servers = [LlamaServer(smollm2_path, slots=2), LlamaServer(smollm2_path, slots=2)]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.kill()


@pytest.fixture()
def servers(pair):
    for s in pair:
        if s.proc is None:  # killed by an earlier test
            s.start()
    return pair


def connect(servers) -> ReplicaEngine:
    return ReplicaEngine.connect([s.url + "/v1" for s in servers], retries=1, backoff=0.05, recheck_s=0.2)


def predicted(server) -> float:
    return scrape(server.url, "llamacpp:tokens_predicted_total")


def requests(eng: ReplicaEngine, i: int) -> dict[str, float]:
    """Completion requests the engine sent to replica ``i``, by kind (tokenizer calls apart)."""
    url = eng.replicas[i].url
    return {labels["kind"]: n for key, n in eng.counters()["upstream_requests"].items()
            if (labels := dict(key))["replica"] == url and labels["kind"] != "tokenizer"}


async def opened(eng, n):
    """``n`` questions started one after the other, each paused after its first event (its
    session open, in flight on its replica)."""
    streams = []
    for _ in range(n):
        stream = astream(eng, POEM, NEVER_STOPS, CONFIG)
        first = await anext(stream)
        assert first.kind == "reasoning"
        streams.append(stream)
    return streams


async def finish(stream):
    """The stream's Result, or the error it ended with."""
    async with aclosing(stream):
        try:
            async for item in stream:
                if isinstance(item, Result):
                    return item
        except ServerError as err:
            return err


@pytest.mark.slow
def test_every_request_of_a_question_goes_to_one_replica(servers):
    eng = connect(servers)
    before = [predicted(s) for s in servers]
    result = run(agenerate(eng, POEM, NEVER_STOPS, CONFIG))
    assert result.probes and result.tokens["answer"] > 0
    grew = [predicted(s) - b for s, b in zip(servers, before)]
    kinds = [requests(eng, i) for i in range(2)]
    # the first replica answered all of it (steps, probes, the answer), the other nothing
    assert grew[0] > 0 and grew[1] == 0, grew
    assert kinds[0].get("step", 0) >= 1 and kinds[0]["probe"] == len(result.probes) and kinds[0]["answer"] >= 1, kinds
    assert not any(kinds[1].values()), kinds  # (its tokenizer answered at connect, no completion)
    eng.close()


@pytest.mark.slow
def test_a_killed_replica_fails_only_its_sessions_and_rejoins_when_back(servers):
    eng = connect(servers)
    a, b = eng.replicas

    async def go():
        streams = await opened(eng, 4)  # least in flight: a, b, a, b
        assert [a.in_flight, b.in_flight] == [2, 2] and all(requests(eng, i)["step"] >= 2 for i in range(2))
        servers[0].kill()
        ends = [await finish(s) for s in streams]
        assert [type(e).__name__ for e in ends] == ["ServerUnreachable", "Result", "ServerUnreachable", "Result"], ends
        assert servers[0].url in str(ends[0]) and "unreachable" in str(ends[0])
        assert not a.healthy and b.healthy and [a.in_flight, b.in_flight] == [0, 0]

        # new questions go to the live replica, and the proxy's /health names the dead one
        done = await asyncio.gather(*(agenerate(eng, POEM, NEVER_STOPS, CONFIG) for _ in range(2)))
        assert all(r.answer_text is not None for r in done) and (a.sessions, b.sessions) == (2, 4)
        app = create_app(eng, ServeOptions(close_engine=False, proxy_api_key="k"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy",
                                     headers={"authorization": "Bearer k"}) as proxy:
            health = (await proxy.get("/health")).json()  # the details, errors included: for the key's holders
            metrics = (await proxy.get("/metrics")).text
            assert (await proxy.get("/health", headers={"authorization": ""})).json() == {"status": "ok"}
        assert health["status"] == "ok" and health["upstream"] == "partial", health
        dead, live = health["replicas"]
        assert (dead["url"], dead["healthy"], live["healthy"]) == (servers[0].url, False, True)
        assert "unreachable" in dead["last_error"] or "ConnectError" in dead["last_error"], dead
        assert re.search(rf'^codestop_replica_sessions_total\{{replica="{re.escape(servers[1].url)}"\}} 4\.0$', metrics, re.MULTILINE)
        assert re.search(rf'^codestop_replica_failures_total\{{replica="{re.escape(servers[0].url)}"\}} 1\.0$', metrics, re.MULTILINE)

        # back on the same port: the next ready() checks it again (in the background) and it rejoins
        await asyncio.to_thread(servers[0].start)
        await asyncio.sleep(eng.recheck_s)
        deadline = time.monotonic() + 10
        while not a.healthy and time.monotonic() < deadline:
            await eng.ready()
            await asyncio.sleep(0.1)
        assert a.healthy
        streams = await opened(eng, 2)  # both idle: the first takes the first replica, the second the other
        assert [a.in_flight, b.in_flight] == [1, 1]
        ends = [await finish(s) for s in streams]
        assert all(isinstance(e, Result) for e in ends), ends
        assert predicted(servers[0]) > 0  # the restarted server's own count starts at 0
        await eng.aclose()

    run(go())



def test_only_a_replica_at_fault_leaves_the_rotation():
    from codestop.engines.replicas import fails_replica
    from codestop.errors import ServerTimeout, UpstreamRejected, UpstreamUnauthorized

    assert fails_replica(ServerUnreachable("refused"))
    assert fails_replica(ServerTimeout("silent"))  # 504: the server itself hangs
    assert fails_replica(ServerError("the completions server answered 503: busy", 502, 503))
    assert not fails_replica(ServerError("the completions server answered 400: bad request", 502, 400))
    assert not fails_replica(UpstreamRejected("the completions server refused the request: it answered 400: bad request", 400))
    assert not fails_replica(UpstreamUnauthorized("the completions server refused the proxy's credentials (401)", 401))
    assert not fails_replica(ServerError("too many", 429))
    assert not fails_replica(CodestopError("not a server error"))
