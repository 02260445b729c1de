"""The completions-server engine against a REAL llama.cpp server (xllamacpp's build of llama.cpp's
``llama-server``, in a subprocess on loopback) serving SmolLM2-135M from PyPI, and against
recorded answers of the SGLang dialect (``httpx.MockTransport``; no SGLang server runs here).

Faults are injected by a small HTTP proxy between the engine and the real server (reject token-id
prompts as llama-cpp-python's server does, answer 503 once, drop a stream mid-way, hang, strip
log-probabilities); nothing stands in for the model. The servers and the proxy live in
tests/llama_servers.py. tests/test_parity.py pins the step rules of
every dialect to the in-process engines' with a scripted server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from contextlib import aclosing

import httpx
import pytest
from harness import free_port
from llama_servers import FaultProxy
from scripted import ToyTokenizer

import codestop
from codestop import CodeStop, Vanilla
from codestop.api import agenerate_question
from codestop.cli import build_parser
from codestop.cli.options import engine_from_args
from codestop.engines.server import HFTokens, ServerEngine, ServerOptions, Upstream, dialect_for, parse_choice, parse_logprobs
from codestop.errors import CodestopError, ContextTooLong, ParameterError, ServerBusy, ServerError, ServerTimeout, UpstreamRejected
from codestop.sampling import Sampling
from codestop.steps import IncrementalDecoder, StepRules, closing_brace_index

pytestmark = pytest.mark.slow

SMOLLM2_EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def engine(llama):
    eng = ServerEngine.connect(llama.url + "/v1", backoff=0.05)
    yield eng
    eng.close()


@pytest.fixture()
def fault(llama):
    proxy = FaultProxy(llama.url)
    yield proxy
    proxy.stop()


def run(coro):
    return asyncio.run(coro)


def greedy_direct(url: str, prompt_ids: list[int], n: int) -> tuple[list[int], str, list[float]]:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt_ids, "max_tokens": n, "temperature": 0, "logprobs": 1}, timeout=60)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    ids = [t["id"] for t in choice["logprobs"]["content"]]
    lps = [t["logprob"] for t in choice["logprobs"]["content"]]
    if ids and ids[-1] == SMOLLM2_EOS:  # llama.cpp lists the EOS it stopped at; a session does not keep it
        ids.pop()
    return ids, choice["text"], lps


def prompt_ids(engine: ServerEngine, question: str) -> list[int]:
    return engine.tokenize(engine.chat_template([{"role": "user", "content": question}]))


async def steps_of(session, max_tokens: int, rules: StepRules) -> list:
    """Steps until one ends otherwise than at a boundary or the tokens run out."""
    outs: list = []
    while sum(len(o.token_ids) for o in outs) < max_tokens:
        out = [item async for item in session.extend(max_tokens - sum(len(o.token_ids) for o in outs), rules)][-1]
        outs.append(out)
        if out.end != "boundary":
            break
    return outs


# --------------------------------------------------------------------------------------------
# Pure parsing (no server)
# --------------------------------------------------------------------------------------------


def test_parse_logprobs_reads_both_server_formats():
    llama_cpp = {"content": [{"id": 33, "token": "1", "bytes": [49], "logprob": -0.5}, {"id": 7, "token": "", "bytes": [226, 152], "logprob": -0.1}]}
    toks = parse_logprobs(llama_cpp)
    assert [(t.id, t.logprob, t.piece) for t in toks] == [(33, -0.5, b"1"), (7, -0.1, b"\xe2\x98")]  # bytes kept whole
    vllm = {"tokens": ["token_id:12", "token_id:5"], "token_logprobs": [-0.2, -0.3], "text_offset": [0, 1], "top_logprobs": None}
    assert [(t.id, t.logprob) for t in parse_logprobs(vllm)] == [(12, -0.2), (5, -0.3)]
    sglang = {"tokens": ["4", "2"], "token_logprobs": [-0.2, -0.3]}
    assert [(t.id, t.logprob) for t in parse_logprobs(sglang)] == [(None, -0.2), (None, -0.3)]
    assert parse_logprobs(None) is None


# --------------------------------------------------------------------------------------------
# SGLang, from recorded answers of the shape its OpenAI server writes (checked against its
# source, python/sglang/srt/entrypoints/openai/{protocol,serving_completions}.py: the matched stop
# is ``matched_stop``, a string for a stop string and the token id for EOS; ids come as
# ``token_ids`` when asked with ``return_token_ids``; logprob tokens are text only)
# --------------------------------------------------------------------------------------------

# SmolLM2's ids: "Q: 2+2?\nA:" | " I am Waiting here\n\n" | "Wait, ok" <|im_end|> | probe "4}"
SGLANG_PROMPT = [65, 42, 216, 34, 27, 34, 47, 198, 49, 42]
PROBE_PROMPT = [198, 504, 3403, 2988, 314, 3814, 4810, 277, 107]  # "\nThe final answer is \\boxed{"
SGLANG_MODELS = json.loads("""{"object": "list", "data": [{"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "object": "model",
  "created": 1735000000, "owned_by": "sglang", "root": "HuggingFaceTB/SmolLM2-135M-Instruct", "parent": null, "max_model_len": 8192}]}""")
SGLANG_PLAIN = [json.loads(s) for s in [
    # step 1, first request: the stop string "Wait" matched inside " Waiting" (no boundary here)
    """{"id": "cmpl-1", "object": "text_completion", "created": 1735000001, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "choices": [{"index": 0, "text": " I am Waiting", "logprobs": {"text_offset": [-1, -1, -1, -1],
        "token_logprobs": [-0.31, -0.12, -1.05, -0.02], "tokens": [" I", " am", " Wa", "iting"],
        "top_logprobs": [{" I": -0.31}, {" am": -0.12}, {" Wa": -1.05}, {"iting": -0.02}]},
        "finish_reason": "stop", "matched_stop": "Wait", "token_ids": [339, 744, 20319, 1802],
        "prompt_token_ids": [65, 42, 216, 34, 27, 34, 47, 198, 49, 42]}],
      "usage": {"prompt_tokens": 10, "total_tokens": 14, "completion_tokens": 4, "prompt_tokens_details": null, "reasoning_tokens": 0},
      "metadata": {"weight_version": "default"}}""",
    # step 1 continued: the blank line
    """{"id": "cmpl-2", "object": "text_completion", "created": 1735000001, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "choices": [{"index": 0, "text": " here\\n\\n", "logprobs": {"text_offset": [-1, -1], "token_logprobs": [-0.4, -0.2],
        "tokens": [" here", "\\n\\n"], "top_logprobs": [{" here": -0.4}, {"\\n\\n": -0.2}]},
        "finish_reason": "stop", "matched_stop": "\\n\\n", "token_ids": [1535, 1116],
        "prompt_token_ids": [65, 42, 216, 34, 27, 34, 47, 198, 49, 42, 339, 744, 20319, 1802]}],
      "usage": {"prompt_tokens": 14, "total_tokens": 16, "completion_tokens": 2, "prompt_tokens_details": null, "reasoning_tokens": 0},
      "metadata": {"weight_version": "default"}}""",
    # a probe: "4}" with the stop "}" kept (no_stop_trim)
    """{"id": "cmpl-3", "object": "text_completion", "created": 1735000002, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "choices": [{"index": 0, "text": "4}", "logprobs": {"text_offset": [-1, -1], "token_logprobs": [-0.05, -0.01],
        "tokens": ["4", "}"], "top_logprobs": [{"4": -0.05}, {"}": -0.01}]},
        "finish_reason": "stop", "matched_stop": "}", "token_ids": [36, 109], "prompt_token_ids": []}],
      "usage": {"prompt_tokens": 25, "total_tokens": 27, "completion_tokens": 2, "prompt_tokens_details": null, "reasoning_tokens": 0},
      "metadata": {"weight_version": "default"}}""",
    # step 2: "Wait" at the very start of a step is no boundary either
    """{"id": "cmpl-4", "object": "text_completion", "created": 1735000003, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "choices": [{"index": 0, "text": "Wait", "logprobs": {"text_offset": [-1], "token_logprobs": [-0.7], "tokens": ["Wait"],
        "top_logprobs": [{"Wait": -0.7}]}, "finish_reason": "stop", "matched_stop": "Wait", "token_ids": [33359], "prompt_token_ids": []}],
      "usage": {"prompt_tokens": 16, "total_tokens": 17, "completion_tokens": 1, "prompt_tokens_details": null, "reasoning_tokens": 0},
      "metadata": {"weight_version": "default"}}""",
    # step 2 continued: EOS, listed in token_ids, matched_stop = its id
    """{"id": "cmpl-5", "object": "text_completion", "created": 1735000003, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "choices": [{"index": 0, "text": ", ok", "logprobs": {"text_offset": [-1, -1, -1], "token_logprobs": [-0.3, -0.6, -0.1],
        "tokens": [",", " ok", "<|im_end|>"], "top_logprobs": [{",": -0.3}, {" ok": -0.6}, {"<|im_end|>": -0.1}]},
        "finish_reason": "stop", "matched_stop": 2, "token_ids": [28, 10907, 2], "prompt_token_ids": []}],
      "usage": {"prompt_tokens": 17, "total_tokens": 20, "completion_tokens": 3, "prompt_tokens_details": null, "reasoning_tokens": 0},
      "metadata": {"weight_version": "default"}}""",
]]


def sglang_stream(ids: list[int], texts: list[str], lps: list[float], matched: int | str | None) -> bytes:
    """A recorded SGLang stream: one event per token (``token_ids`` the delta), the finish reason
    and ``matched_stop`` on the last, then ``[DONE]``."""
    events = []
    for i, (t, text, lp) in enumerate(zip(ids, texts, lps)):
        last = i == len(ids) - 1
        choice = {"index": 0, "text": text, "logprobs": {"text_offset": [-1], "token_logprobs": [lp], "tokens": [text], "top_logprobs": [{text: lp}]},
                  "finish_reason": "stop" if last else None, "matched_stop": matched if last else None, "token_ids": [t]}
        events.append({"id": "cmpl-9", "object": "text_completion", "created": 1735000009, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                       "choices": [choice], "usage": None})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


class Replay:
    """Answers requests with recorded answers, in order, and keeps what was asked."""

    def __init__(self, answers: list) -> None:
        self.answers = list(answers)
        self.seen: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=SGLANG_MODELS)
        self.seen.append(json.loads(request.content))
        answer = self.answers.pop(0)
        if isinstance(answer, bytes):
            return httpx.Response(200, content=answer, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=answer)


def test_sglang_plain_steps_read_matched_stop_and_token_ids(tokenizer):
    replay = Replay(SGLANG_PLAIN)
    eng = ServerEngine.connect("http://sglang:30000/v1", tokenizer=tokenizer, transport=httpx.MockTransport(replay))
    assert eng.dialect.name == "sglang" and eng.context_window == 8192

    async def go():
        session = await eng.start(SGLANG_PROMPT, Sampling(temperature=0.0))
        first = [item async for item in session.extend(100, StepRules(("\n\n",), ("Wait",)))][-1]
        probe = await session.probe(PROBE_PROMPT, 20)
        second = [item async for item in session.extend(100, StepRules(("\n\n",), ("Wait",)))][-1]
        return first, probe, second

    first, probe, second = run(go())
    # "Waiting" matched the stop "Wait" server-side: the step goes on (before: it ended as if at EOS)
    assert (first.token_ids, first.text, first.end) == ([339, 744, 20319, 1802, 1535, 1116], " I am Waiting here\n\n", "boundary")
    assert (probe.token_ids, probe.logprobs) == ([36, 109], [-0.05, -0.01])
    # matched_stop 2 is EOS's id: the step ends there, EOS not kept
    assert (second.token_ids, second.text, second.end) == ([33359, 28, 10907], "Wait, ok", "eos")
    steps = [b for b in replay.seen if b["stop"] != ["}"]]
    assert all(b["no_stop_trim"] is True and b["return_token_ids"] is True for b in replay.seen)
    assert all("logprobs" not in b for b in steps) and replay.seen[2]["logprobs"] == 1  # only the probe asks for them
    assert steps[0]["stop"] == ["\n\n", "Wait"] and steps[1]["prompt"] == SGLANG_PROMPT + [339, 744, 20319, 1802]
    assert replay.seen[2]["prompt"] == SGLANG_PROMPT + first.token_ids + PROBE_PROMPT and replay.seen[2]["temperature"] == 0.0
    assert eng.counters()["upstream_requests"] == {"step": 4, "probe": 1}
    eng.close()


def test_sglang_streamed_steps_read_token_id_deltas(tokenizer):
    one = sglang_stream([339, 744, 20319, 1802, 1535, 1116, 33359, 28, 10907, 2],
                        [" I", " am", " Wa", "iting", " here", "\n\n", "Wait", ",", " ok", ""], [-0.1] * 10, 2)
    two = sglang_stream([33359, 28, 10907, 2], ["Wait", ",", " ok", ""], [-0.1] * 4, 2)
    replay = Replay([one, two])
    eng = ServerEngine.connect("http://sglang:30000/v1", tokenizer=tokenizer, transport=httpx.MockTransport(replay))

    async def go():
        session = await eng.start(SGLANG_PROMPT, Sampling(temperature=0.0), live=True)
        return await steps_of(session, 100, StepRules(("\n\n",), ("Wait",)))

    first, second = run(go())
    assert (first.text, first.end, second.text, second.end) == (" I am Waiting here\n\n", "boundary", "Wait, ok", "eos")
    # a stream carries the stops that fit too (the server ends there exactly), kept in the output
    assert all(b["stream"] is True and b["stop"] == ["\n\n", "Wait"] and b["no_stop_trim"] is True and b["return_token_ids"] is True
               and "logprobs" not in b for b in replay.seen)
    assert parse_choice(json.loads(one.split(b"\n\n")[-3][6:])).stop == 2  # the last event: EOS's id
    eng.close()


# --------------------------------------------------------------------------------------------
# Text prompts, health, counters, closing (a scripted server)
# --------------------------------------------------------------------------------------------


def scripted_server(reject_ids: bool, reject_text: bool, calls: list):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})
        body = json.loads(request.content)
        calls.append(body)
        if isinstance(body["prompt"], list) and reject_ids or isinstance(body["prompt"], str) and reject_text:
            return httpx.Response(400, json={"error": {"message": "bad request: max_tokens too large"}})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "stop_reason": None,
                                                      "logprobs": {"tokens": ["token_id:0"], "token_logprobs": [-0.1]}}]})
    return httpx.MockTransport(handler)


def toy_engine(transport, **kwargs) -> tuple[ServerEngine, ToyTokenizer]:
    tok = ToyTokenizer()
    eng = ServerEngine("http://up", Upstream("m", dialect_for("vllm"), HFTokens(tok, "toy"), eos=frozenset({0})),
                       ServerOptions(backoff=0.0, transport=transport, **kwargs))
    return eng, tok


async def one_step(eng: ServerEngine, prompt: list[int]):
    session = await eng.start(prompt, Sampling())
    # a step with a boundary: one plain request (one without any runs to the end, streamed)
    return [item async for item in session.extend(10, StepRules(separators=("\n\n",)))][-1]


def test_a_400_for_token_ids_switches_to_text_only_when_text_works():
    calls: list = []
    eng, tok = toy_engine(scripted_server(reject_ids=True, reject_text=True, calls=calls))
    with pytest.raises(UpstreamRejected, match="refused the request: it answered 400: bad request: max_tokens too large") as refused:
        run(one_step(eng, tok.ids("hi")))
    assert refused.value.status == 400  # the server's words, relayed as the client's error
    assert not eng.transport.text_prompts and eng.transport.stats.text_fallbacks == 0  # an ordinary 400 switches nothing
    assert [type(c["prompt"]) for c in calls] == [list, str]  # the same request, tried once as text

    calls.clear()
    eng, tok = toy_engine(scripted_server(reject_ids=True, reject_text=False, calls=calls))
    assert run(one_step(eng, tok.ids("hi"))).end == "eos"
    assert run(one_step(eng, tok.ids("hi"))).end == "eos"
    assert eng.transport.text_prompts and eng.counters()["upstream_text_fallbacks"] == {"": 1}
    assert [type(c["prompt"]) for c in calls] == [list, str, str]  # switched: later requests go as text


def test_a_400_after_token_ids_worked_is_an_error_not_a_switch():
    calls: list = []
    state = {"reject": False}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        if state["reject"]:
            return httpx.Response(422, json={"detail": "logprobs: must be <= 0"})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "", "finish_reason": "stop",
                                                      "logprobs": {"tokens": ["token_id:0"], "token_logprobs": [-0.1]}}]})

    eng, tok = toy_engine(httpx.MockTransport(handler))
    run(one_step(eng, tok.ids("hi")))
    state["reject"] = True
    with pytest.raises(ServerError, match="422: logprobs: must be <= 0"):
        run(one_step(eng, tok.ids("hi")))
    assert not eng.transport.text_prompts and all(isinstance(c["prompt"], list) for c in calls)


def test_health_counters_and_aclose_close_every_loops_client():
    up = {"ok": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if not up["ok"]:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    eng, _ = toy_engine(httpx.MockTransport(handler))
    assert run(eng.health())["ok"] is True
    up["ok"] = False
    health = run(eng.health())
    assert (health["ok"], health["upstream"], health["error"]) == (False, "unreachable", "ConnectError")
    assert set(eng.counters()) == {"upstream_requests", "upstream_retries", "upstream_text_fallbacks"}

    up["ok"] = True
    other = asyncio.new_event_loop()  # a loop running in another thread, as a server's might
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(eng.health(), other).result(10)

    async def here():
        await eng.health()
        clients = [s.client for s in eng.transport.loops.values()]
        await eng.aclose()
        return clients

    clients = run(here())
    assert len(clients) == 2 and all(c.is_closed for c in clients) and eng.transport.sync.is_closed
    other.call_soon_threadsafe(other.stop)
    thread.join(10)
    other.close()


def test_the_upstream_key_comes_from_the_environment(monkeypatch):
    sent: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})

    monkeypatch.delenv("CODESTOP_UPSTREAM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    ServerEngine.connect("http://up/v1", tokenizer=ToyTokenizer(), transport=httpx.MockTransport(handler)).close()
    monkeypatch.setenv("CODESTOP_UPSTREAM_API_KEY", "sk-upstream")
    ServerEngine.connect("http://up/v1", tokenizer=ToyTokenizer(), transport=httpx.MockTransport(handler)).close()
    ServerEngine.connect("http://up/v1", api_key="sk-flag", tokenizer=ToyTokenizer(), transport=httpx.MockTransport(handler)).close()
    assert sent == ["Bearer sk-openai", "Bearer sk-upstream", "Bearer sk-flag"]


def test_an_upstream_that_comes_up_serving_another_model_is_a_clear_503(monkeypatch):
    """wait=False: a server not reachable yet is "starting"; one that then answers without the
    model asked for is "error", and its message says why (not "still starting")."""
    state = {"up": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if not state["up"]:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"data": [{"id": "other", "owned_by": "vllm"}]})

    monkeypatch.setattr("codestop.engines.server.engine.RECONNECT_INTERVAL_S", 0.0)
    eng = ServerEngine.connect("http://up/v1", model="m", wait=False, tokenizer=ToyTokenizer(), transport=httpx.MockTransport(handler))
    assert not eng.connected and eng.served_models == []
    assert run(eng.health())["upstream"] == "starting"
    with pytest.raises(ServerError, match="not ready yet") as caught:
        eng.tokenize("hi")
    assert caught.value.status == 503
    state["up"] = True
    health = run(eng.health())
    assert (health["ok"], health["upstream"]) == (False, "error") and "does not serve 'm'" in health["error"]
    with pytest.raises(ServerError, match="up but unusable: model: .* does not serve 'm'; it serves other") as caught:
        run(eng.start([1, 2], Sampling()))
    assert caught.value.status == 503
    with pytest.raises(CodestopError, match="does not serve 'm'"):  # answering wrongly is an error at once
        ServerEngine.connect("http://up/v1", model="m", wait=False, tokenizer=ToyTokenizer(), transport=httpx.MockTransport(handler))


def test_max_stops_is_checked_once():
    with pytest.raises(ValueError, match="max_stops: 0 must be an integer >= 1"):
        toy_engine(httpx.MockTransport(lambda r: httpx.Response(200)), max_stops=0)


# --------------------------------------------------------------------------------------------
# Against the real server
# --------------------------------------------------------------------------------------------


def test_connect_reads_the_served_model_and_the_servers_tokenizer_matches_the_real_one(engine, tokenizer):
    assert engine.dialect.name == "llamacpp"
    assert engine.context_window == 2048
    assert engine.eos_token_ids == frozenset({tokenizer.convert_tokens_to_ids("<|im_end|>")})
    sample = "<|im_start|>user\nWhat is 12 + 30? Wait, déjà vu.\n\n<|im_end|>"
    assert engine.tokenize(sample) == tokenizer.encode(sample, add_special_tokens=False)
    # a character over 3 tokens: its pieces' bytes come with /tokenize (and logprobs), never as U+FFFD
    ids = engine.tokenize("Hello wörld 猫\n\nWait")
    assert ids == tokenizer.encode("Hello wörld 猫\n\nWait", add_special_tokens=False)
    assert engine.detokenize(ids) == IncrementalDecoder(engine.detokenize, ids).text == "Hello wörld 猫\n\nWait"
    assert "<|im_start|>assistant\n" in engine.chat_template([{"role": "user", "content": "hi"}])
    assert run(engine.health())["upstream"] == "ok"


def test_connect_errors_are_one_clear_line():
    with pytest.raises(CodestopError, match="cannot reach a completions server"):
        ServerEngine.connect(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(CodestopError, match="not an http"):
        ServerEngine.connect("localhost:8000")


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_steps_split_at_separators_reassemble_the_servers_own_greedy_text(engine, llama, live):
    ids = prompt_ids(engine, "Describe the moon in three short sentences.")
    want_ids, want_text, _ = greedy_direct(llama.url, ids, 40)

    async def steps():
        session = await engine.start(ids, Sampling(temperature=0.0), live=live)
        return await steps_of(session, 40, StepRules((" ",)))

    outs = run(steps())
    assert len(outs) > 5  # a step per word
    # a separator ends the step with the token that holds it
    assert all(" " in engine.detokenize(o.token_ids[-1:]) for o in outs if o.end == "boundary")
    assert [t for o in outs for t in o.token_ids] == want_ids
    assert "".join(o.text for o in outs) == want_text


def test_plain_requests_per_step_walk_the_tokens_by_the_same_rules_as_streams(llama, engine):
    """Unless the text is shown live, a step is one plain request with the boundaries as server
    stops (llama.cpp: its native /completion, which lists every generated id, the trimmed stop
    string's too); a live step is streamed and cut by codestop. Both must give the same steps."""
    ids = prompt_ids(engine, "List three colours, one per line.")
    rules = StepRules(("\n",), ("Blue",))

    async def steps(live: bool):
        eng = ServerEngine.connect(llama.url)
        session = await eng.start(ids, Sampling(temperature=0.0), live=live)
        outs = await steps_of(session, 60, rules)
        await eng.aclose()
        return [(o.token_ids, o.text, o.end) for o in outs], eng.counters()["upstream_requests"]

    (streamed, n_streamed), (walked, n_walked) = run(steps(True)), run(steps(False))
    assert walked == streamed and len(streamed) >= 3
    assert n_walked["step"] <= 2 * len(walked) and n_streamed["step"] == len(streamed)


def test_word_boundary_ends_the_step_before_the_word_and_carries_it_into_the_next(engine, llama):
    ids = prompt_ids(engine, "Describe the moon in three short sentences.")
    want_ids, want_text, _ = greedy_direct(llama.url, ids, 40)
    word = "the" if " the" in want_text[1:] else want_text.split()[3]

    async def steps():
        session = await engine.start(ids, Sampling(temperature=0.0))
        return await steps_of(session, 40, StepRules((), (word,)))

    outs = run(steps())
    boundary_steps = [o for o in outs if o.end == "boundary"]
    assert boundary_steps, f"the greedy text has {word!r}: {want_text!r}"
    assert all(word not in o.text.split()[-1:] for o in boundary_steps)  # the word is not in the step that it ends
    for prev, nxt in itertools.pairwise(outs):
        if prev.end == "boundary":
            assert nxt.text.lstrip().startswith(word)  # it starts the next step
    assert [t for o in outs for t in o.token_ids] == want_ids[: sum(len(o.token_ids) for o in outs)]


def test_probe_is_greedy_stops_at_the_closing_brace_and_leaves_the_session_unchanged(engine, llama):
    ids = prompt_ids(engine, "What is 12 + 30? Answer with a number.")
    probe_ids = engine.tokenize("\n**Final Answer**\n\nThe final answer is \\boxed{")

    async def go():
        session = await engine.start(ids, Sampling(temperature=0.0))
        first = [x async for x in session.extend(12, StepRules(("\n\n",)))][-1]
        n_before = session.n_tokens
        probe = await session.probe(probe_ids, 20)
        assert session.n_tokens == n_before
        second = [x async for x in session.extend(12, StepRules(("\n\n",)))][-1]
        return first, probe, second

    first, probe, second = run(go())
    # the probe changed nothing: the two steps equal one uninterrupted greedy run
    want_ids, _, _ = greedy_direct(llama.url, ids, len(first.token_ids) + len(second.token_ids))
    assert first.token_ids + second.token_ids == want_ids
    assert probe.prompt_tokens == len(probe_ids)
    # the same greedy continuation asked directly, cut where its box closes, is the probe exactly
    direct_ids, direct_text, direct_lps = greedy_direct(llama.url, ids + first.token_ids + probe_ids, 20)
    assert closing_brace_index(direct_text) is not None, f"the model closes its box within 20 tokens: {direct_text!r}"
    decoder = IncrementalDecoder(engine.detokenize)
    for n, tok in enumerate(direct_ids, 1):  # noqa: B007 - n is read after the loop
        decoder.add(tok)
        if closing_brace_index(decoder.text) is not None:
            break
    assert n < 20 and probe.token_ids == direct_ids[:n]  # not 20 tokens, not one token short of the brace
    assert probe.logprobs == pytest.approx(direct_lps[:n], abs=1e-3)


def test_probe_requests_never_ask_for_echo_or_prompt_logprobs(fault):
    eng = ServerEngine.connect(fault.url, backoff=0.05)
    result = run(agenerate_question(eng, "What is 2 + 2?", CodeStop(), max_reasoning_tokens=40, probe_interval=1, boundaries=[" "], temperature=0.0))
    ids = fault.seen[0]["prompt"]  # the question's prompt, as the first step sent it
    probes = [b for b in fault.seen if b.get("max_tokens") and b["max_tokens"] <= 20 and b.get("temperature") == 0.0 and b.get("stream")]
    assert probes and len(probes) >= len(result.probes) >= 1
    for body in probes:
        assert not body.get("echo") and "prompt_logprobs" not in body and body["logprobs"]
        assert isinstance(body["prompt"], list) and body["prompt"][: len(ids)] == ids  # token ids, same prefix
    eng.close()


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_a_whole_question_runs_through_the_controller(engine, live):
    result = run(agenerate_question(engine, "What is 12 + 30?", CodeStop(), max_reasoning_tokens=60, probe_interval=1,
                                    boundaries=[" "], temperature=0.0, live_text=live))
    assert result.engine == "server"
    assert result.probes and all(0 <= p.confidence <= 1 for p in result.probes)
    # which reason ends it is not fixed: the probes run beside the stream (overlapped, the default)
    # on a llama-server with its default batch, where a probe's prefill can change a later greedy
    # token (docs/serving.md, "Overlapped and sequential"), so the reasoning after the first probe,
    # and the probes, differ from run to run. The reason is the policy's own on the probes this run saw.
    decision = CodeStop().decide(result.probes)
    if decision.stop:
        assert (result.stop_reason, result.stop_position) == (decision.reason, result.probes[-1].position)
    else:
        assert result.stop_reason == ("max_reasoning_tokens" if result.stop_position == 60 else "finished")
    assert result.tokens["reasoning"] == result.stop_position <= 60
    assert result.answer_text  # the forced (or own) answer


def test_the_servers_own_tokenizer_never_blocks_the_event_loop(llama):
    eng = ServerEngine.connect(llama.url, backoff=0.05)
    loop_thread: list = []
    calls: list = []
    post = eng.tokens.client.post

    def recording_post(*args, **kwargs):
        calls.append(threading.current_thread())
        return post(*args, **kwargs)

    eng.tokens.client.post = recording_post
    eng.transport.sync.post = recording_post

    async def go():
        loop_thread.append(threading.current_thread())
        return await agenerate_question(eng, "Name a prime number greater than 10.", CodeStop(), max_reasoning_tokens=30,
                                        probe_interval=1, boundaries=[" "], temperature=0.0)

    result = run(go())
    assert result.probes and calls  # the template and the prompt went to the server...
    assert loop_thread[0] not in calls  # ...from worker threads only
    eng.close()


def test_many_concurrent_sessions_share_one_engine(engine):
    questions = [f"What is {i} + {i}?" for i in range(8)]

    async def many():
        return await asyncio.gather(
            *(agenerate_question(engine, q, Vanilla(), max_reasoning_tokens=16, temperature=0.0) for q in questions)
        )

    results = run(many())
    assert len(results) == 8 and all(r.tokens["reasoning"] >= 1 for r in results)
    # the same greedy question alone gives the same tokens as under concurrency
    alone = run(agenerate_question(engine, questions[3], Vanilla(), max_reasoning_tokens=16, temperature=0.0))
    assert alone.reasoning_text == results[3].reasoning_text


def test_rejected_token_id_prompts_fall_back_to_text(fault, engine):
    fault.mode = "reject_ids"
    eng = ServerEngine.connect(fault.url, backoff=0.05, stream_steps=True)  # llama-cpp-python has no native endpoint
    q = "Name a colour."
    got = run(agenerate_question(eng, q, Vanilla(), max_reasoning_tokens=12, temperature=0.0))
    want = run(agenerate_question(engine, q, Vanilla(), max_reasoning_tokens=12, temperature=0.0))
    assert eng.transport.text_prompts and eng.transport.stats.text_fallbacks == 1
    assert isinstance(fault.seen[-1]["prompt"], str)
    assert got.reasoning_text == want.reasoning_text
    eng.close()


def test_503_is_retried_and_a_stream_cut_midway_resumes_where_it_broke(fault, engine):
    eng = ServerEngine.connect(fault.url, backoff=0.05, stream_steps=True)
    q = "Describe the sea."
    want = run(agenerate_question(engine, q, Vanilla(), max_reasoning_tokens=30, temperature=0.0))
    fault.mode = "status_once"
    got = run(agenerate_question(eng, q, Vanilla(), max_reasoning_tokens=30, temperature=0.0))
    assert eng.transport.stats.retries == 1 and got.reasoning_text == want.reasoning_text
    fault.mode = "drop_once"
    got = run(agenerate_question(eng, q, Vanilla(), max_reasoning_tokens=30, temperature=0.0))
    assert eng.transport.stats.retries == 2 and got.reasoning_text == want.reasoning_text
    eng.close()


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_a_hanging_server_times_out_once_after_the_timeout(fault, live):
    """Plain or streamed, a silent server is one 504 after ``timeout``: not retried, not a 502
    "unreachable" after the template and the tokenizer each waited it out."""
    eng = ServerEngine.connect(fault.url, timeout=1.0, backoff=0.05)
    fault.mode = "hang_all"
    t0 = time.monotonic()
    with pytest.raises(ServerTimeout, match="did not answer within 1 s") as caught:
        run(agenerate_question(eng, "hi", Vanilla(), max_reasoning_tokens=8, live_text=live))
    assert time.monotonic() - t0 < 1.9 and caught.value.status == 504
    eng.close()


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_a_server_that_answers_pings_but_never_a_completion_is_busy_after_the_queue_timeout(fault, live):
    """Its completions hang while it answers everything else (a ping of /v1/models too): that is
    life, not silence, so no 504 after ``timeout``; past ``queue_timeout`` one 503 with a
    Retry-After, not retried."""
    eng = ServerEngine.connect(fault.url, timeout=1.0, queue_timeout=2.0, backoff=0.05)
    fault.mode = "hang"
    fault.seen.clear()
    t0 = time.monotonic()
    with pytest.raises(ServerBusy, match="sent this request nothing for 2 s") as caught:
        run(agenerate_question(eng, "hi", Vanilla(), max_reasoning_tokens=8, live_text=live))
    assert 2.0 <= time.monotonic() - t0 < 2.9 and caught.value.status == 503 and caught.value.retry_after == 10
    assert len(fault.seen) == 1
    eng.close()


def test_a_server_without_logprobs_is_a_clear_error(fault):
    eng = ServerEngine.connect(fault.url, backoff=0.05)
    fault.mode = "no_logprobs"
    ids = prompt_ids(eng, "What is 1 + 1?")

    async def go():
        session = await eng.start(ids, Sampling(temperature=0.0))
        await session.probe(eng.tokenize("The final answer is \\boxed{"), 20)

    with pytest.raises(ServerError, match="no logprobs"):
        run(go())
    eng.close()


def test_a_prompt_longer_than_the_window_is_refused_before_any_request(engine):
    with pytest.raises(ContextTooLong, match="2048"):
        run(agenerate_question(engine, "word " * 2500, Vanilla(), max_reasoning_tokens=8))


def test_load_engine_hook_picks_the_server_engine(llama):
    from codestop.models import load_engine

    eng = load_engine(None, base_url=llama.url + "/v1")  # --base-url alone implies --engine server
    assert isinstance(eng, ServerEngine) and eng.model_name.endswith(".gguf")
    eng.close()


# --------------------------------------------------------------------------------------------
# Options: one validated ServerOptions; unknown options are errors naming them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [
    ("concurrency", 0), ("concurrency", 2.5), ("retries", -1), ("retries", True), ("timeout", 0), ("timeout", float("nan")),
    ("connect_timeout", -1.0), ("backoff", -0.1), ("max_stops", 0), ("stream_steps", "yes"), ("api_key", 7),
])
def test_server_options_are_checked_once_naming_the_option_and_its_value(name, value):
    with pytest.raises(ParameterError) as caught:
        ServerOptions(**{name: value})
    if name == "api_key":  # a key, even a malformed one, is never echoed
        assert caught.value.param == name and str(caught.value) == "api_key: '[redacted]' must be a string"
        return
    assert caught.value.param == name and caught.value.value is value and str(caught.value).startswith(f"{name}: {value!r} must")


def test_an_unknown_option_is_named_with_the_closest_known_one_before_any_request():
    calls: list = []
    transport = httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(200, json={"data": [{"id": "m"}]}))
    with pytest.raises(CodestopError, match=r"^retires: unknown option of the server engine \(did you mean retries\?\); it takes "):
        codestop.load("m", base_url="http://up/v1", retires=7, transport=transport)
    with pytest.raises(CodestopError, match=r"^retires, timout: unknown options .*\(did you mean retries for retires, timeout for timout\?\)"):
        ServerEngine.connect("http://up/v1", retires=7, timout=1, transport=transport)
    assert calls == []  # refused before connecting
    eng = ServerEngine.connect("http://up/v1", retries=7, tokenizer=ToyTokenizer(), transport=transport)
    assert eng.options.retries == 7 and eng.options.max_stops is None and eng.stops_for(StepRules(("a", "b", "c", "d", "e")))[0] == ["a", "b", "c", "d"]
    eng.close()


def test_the_command_line_names_an_option_the_engine_does_not_take():
    args = build_parser().parse_args(["run", "q", "--base-url", "http://up/v1", "--threads", "2"])
    with pytest.raises(CodestopError, match=r"^threads: unknown option of the server engine; it takes base_url, model"):
        engine_from_args(args)


def test_a_chat_request_holds_a_place_in_the_limit_and_reads_the_servers_sse(llama):
    """ServerEngine.chat (agents' answer phase) is sent as every request is: an open stream holds
    one of the ``concurrency`` places, so a second request waits for it and, past
    ``queue_timeout``, is turned away (503); the stream's events are the server's JSON payloads
    up to its usage, a plain answer its JSON."""
    eng = ServerEngine.connect(llama.url + "/v1", concurrency=1, queue_timeout=5)  # room for a plain answer on a busy host
    messages = [{"role": "user", "content": "Count from one to fifty in words."}]

    async def plain(max_tokens: int) -> dict:
        async with aclosing(eng.chat(messages, "", {"max_tokens": max_tokens}, Sampling(temperature=0), stream=False)) as answers:
            return await anext(answers)

    async def go():
        streamed = eng.chat(messages, "", {"max_tokens": 20}, Sampling(temperature=0), stream=True)
        first = await anext(streamed)  # the stream is open: its place is taken
        assert first["object"] == "chat.completion.chunk"
        with pytest.raises(ServerBusy, match="all 1 of its places"):
            await plain(4)
        rest = [payload async for payload in streamed]
        assert rest[-1]["usage"]["completion_tokens"] >= 1 and rest[-1]["choices"] == []  # include_usage, then [DONE]
        answer = await plain(4)  # the place is free again
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 4
        await eng.aclose()

    run(go())
    assert eng.counters()["upstream_requests"]["chat"] == 2  # the one turned away never reached the server


def test_upstream_json_is_read_as_python_writes_it_even_where_orjson_refuses():
    """A logprob of -inf reaches the proxy as ``-Infinity`` from a server that answers through
    Python's json.dumps (vLLM's plain answers): orjson refuses it, the stdlib reads it."""
    from codestop.engines.server.transport import parse_json

    assert parse_json(b'{"choices": [{"logprobs": {"token_logprobs": [-Infinity, -0.5]}}]}', "u") == {
        "choices": [{"logprobs": {"token_logprobs": [float("-inf"), -0.5]}}]}
    with pytest.raises(ServerError, match="invalid JSON"):
        parse_json(b'{"choices": [', "u")
