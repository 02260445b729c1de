"""The completions-server engine against a REAL llama.cpp server (xllamacpp's build of llama.cpp's
``llama-server``, in a subprocess on loopback) serving SmolLM2-135M from PyPI.

Faults are injected by a small HTTP proxy between the engine and the real server (reject token-id
prompts as llama-cpp-python's server does, answer 503 once, drop a stream mid-way, hang, strip
log-probabilities); nothing stands in for the model. The helpers here (``LlamaServer``,
``FaultProxy``) are reused by tests/test_serve.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from codestop import CodeStop, Vanilla
from codestop.api import agenerate_question
from codestop.engines.base import Boundaries, Sampling
from codestop.engines.server import ServerEngine, ServerError, ServerTimeout, TextAssembler, parse_logprobs

pytestmark = pytest.mark.slow

# llama.cpp's own HTTP server, started through xllamacpp (prebuilt wheels, no compiler needed)
LAUNCH = """
import sys, time, xllamacpp
gguf, port, slots, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
p = xllamacpp.CommonParams()
p.model.path = gguf
p.port = port
p.n_parallel = slots
p.n_ctx = n_ctx * slots
p.cpuparams.n_threads = 1
p.cpuparams_batch.n_threads = 1
p.endpoint_metrics = True
server = xllamacpp.Server(p)
print("listening", server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


SMOLLM2_EOS = 2  # <|im_end|>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A real llama.cpp server in a subprocess; ``kill`` and ``start`` again on the same port."""

    def __init__(self, gguf: Path, slots: int = 4, n_ctx: int = 2048, port: int | None = None) -> None:
        self.gguf, self.slots, self.n_ctx = gguf, slots, n_ctx
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LlamaServer":
        args = [sys.executable, "-c", LAUNCH, str(self.gguf), str(self.port), str(self.slots), str(self.n_ctx)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("llama.cpp server did not come up in 120 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class FaultProxy:
    """An HTTP proxy in front of the real server that injects one kind of fault at a time.

    mode: "pass"; "reject_ids" (422 for token-id prompts, as llama-cpp-python's server answers);
    "status_once" (one 503, then pass); "drop_once" (cut the next stream after a few events);
    "hang" (never answer); "no_logprobs" (strip log-probabilities from answers)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.seen: list[dict] = []
        self.port = free_port()
        app = FastAPI()
        client = httpx.AsyncClient(timeout=60)

        @app.get("/{path:path}")
        async def get(path: str) -> Response:
            r = await client.get(f"{upstream}/{path}")
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

        @app.post("/{path:path}")
        async def post(path: str, request: Request) -> Response:
            body = await request.json()
            mode = self.mode
            if path in ("v1/completions", "completion"):  # OpenAI-style and llama.cpp's native endpoint
                self.seen.append(body)
                if mode == "reject_ids" and isinstance(body.get("prompt"), list):
                    return JSONResponse({"detail": [{"loc": ["body", "prompt"], "msg": "str type expected"}]}, 422)
                if mode == "status_once":
                    self.mode = "pass"
                    return JSONResponse({"error": {"message": "busy"}}, 503)
                if mode == "hang":
                    await asyncio.sleep(3600)
            if not body.get("stream"):
                r = await client.post(f"{upstream}/{path}", json=body)
                data = r.json()
                if mode == "no_logprobs":
                    for c in data.get("choices", []):
                        c["logprobs"] = None
                return JSONResponse(data, r.status_code)
            if mode == "drop_once":
                self.mode = "pass"

            async def relay():
                n = 0
                async with client.stream("POST", f"{upstream}/{path}", json=body) as r:
                    async for line in r.aiter_lines():
                        n += 1
                        if mode == "drop_once" and n > 6:
                            raise ConnectionResetError("fault injected: stream cut")
                        yield line + "\n"

            return StreamingResponse(relay(), media_type="text/event-stream")

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True  # do not wait for a request left hanging on purpose
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def llama(smollm2_path):
    server = LlamaServer(smollm2_path).start()
    yield server
    server.kill()


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


def greedy_direct(url: str, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt_ids, "max_tokens": n, "temperature": 0, "logprobs": 1}, timeout=60)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    ids = [t["id"] for t in choice["logprobs"]["content"]]
    if ids and ids[-1] == SMOLLM2_EOS:  # llama.cpp lists the EOS it stopped at; a session does not keep it
        ids.pop()
    return ids, choice["text"]


def prompt_ids(engine: ServerEngine, question: str) -> list[int]:
    return engine.tokenize(engine.chat_template([{"role": "user", "content": question}]))


# --------------------------------------------------------------------------------------------
# Pure parsing (no server)
# --------------------------------------------------------------------------------------------


def test_parse_logprobs_reads_both_server_formats():
    llama_cpp = {"content": [{"id": 33, "token": "1", "bytes": [49], "logprob": -0.5}, {"id": 7, "token": "", "bytes": [], "logprob": -0.1}]}
    toks = parse_logprobs(llama_cpp)
    assert [(t.id, t.logprob, t.text) for t in toks] == [(33, -0.5, "1"), (7, -0.1, "")]
    vllm = {"tokens": ["token_id:12", "token_id:5"], "token_logprobs": [-0.2, -0.3], "text_offset": [0, 1], "top_logprobs": None}
    assert [(t.id, t.logprob) for t in parse_logprobs(vllm)] == [(12, -0.2), (5, -0.3)]
    sglang = {"tokens": ["4", "2"], "token_logprobs": [-0.2, -0.3]}
    assert [(t.id, t.text) for t in parse_logprobs(sglang)] == [(None, "4"), (None, "2")]
    assert parse_logprobs(None) is None


def test_text_assembler_matches_full_decode_and_waits_for_whole_characters(tokenizer):
    text = "Schrödinger's 猫 wait 42 — done\n\nWait"
    ids = tokenizer.encode(text, add_special_tokens=False)
    asm = TextAssembler(lambda x: tokenizer.decode(x))
    pieces = [asm.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == asm.text
    assert all("\ufffd" not in p for p in pieces)
    at = asm.text.index("Wait")
    keep = asm.keep_before(at)
    assert len(tokenizer.decode(ids[:keep])) <= at < len(tokenizer.decode(ids[: keep + 1]))


# --------------------------------------------------------------------------------------------
# Against the real server
# --------------------------------------------------------------------------------------------


def test_connect_reads_the_served_model_and_the_servers_tokenizer_matches_the_real_one(engine, tokenizer):
    assert engine.server_kind == "llamacpp"
    assert engine.context_window == 2048
    assert engine.eos_token_ids == frozenset({tokenizer.convert_tokens_to_ids("<|im_end|>")})
    sample = "<|im_start|>user\nWhat is 12 + 30? Wait, déjà vu.\n\n<|im_end|>"
    assert engine.tokenize(sample) == tokenizer.encode(sample, add_special_tokens=False)
    ids = tokenizer.encode("Hello wörld\n\nWait", add_special_tokens=False)
    assert engine.detokenize(ids) == tokenizer.decode(ids)
    assert "<|im_start|>assistant\n" in engine.chat_template([{"role": "user", "content": "hi"}])


def test_connect_errors_are_one_clear_line():
    from codestop.engines.base import CodestopError

    with pytest.raises(CodestopError, match="cannot reach a completions server"):
        ServerEngine.connect(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(CodestopError, match="not an http"):
        ServerEngine.connect("localhost:8000")


def test_steps_split_at_separators_reassemble_the_servers_own_greedy_text(engine, llama):
    ids = prompt_ids(engine, "Describe the moon in three short sentences.")
    want_ids, want_text = greedy_direct(llama.url, ids, 40)

    async def steps():
        session = await engine.start(ids, Sampling(temperature=0.0))
        outs = []
        while sum(len(o.token_ids) for o in outs) < 40:
            out = await session.extend(40 - sum(len(o.token_ids) for o in outs), Boundaries((" ",), ()))
            outs.append(out)
            if out.end != "boundary":
                break
        return outs

    outs = run(steps())
    assert len(outs) > 5  # a step per word
    # a separator ends the step with the token that holds it (" moon" ends one here)
    assert all(" " in engine.detokenize(o.token_ids[-1:]) for o in outs if o.end == "boundary")
    assert [t for o in outs for t in o.token_ids] == want_ids
    assert "".join(o.text for o in outs) == want_text


def test_plain_requests_per_step_walk_the_tokens_by_the_same_rules_as_streams(llama, engine):
    """Unless the text is shown live, a step is one plain request with the boundaries as server
    stops (llama.cpp: its native /completion, which lists every generated id, the trimmed stop
    string's too); a live step is streamed and cut by codestop. Both must give the same steps."""
    plain = ServerEngine.connect(llama.url, stream_steps=False)
    streaming = ServerEngine.connect(llama.url, stream_steps=True)
    ids = prompt_ids(engine, "List three colours, one per line.")
    boundaries = Boundaries(("\n",), ("Blue",))

    async def steps(eng):
        session = await eng.start(ids, Sampling(temperature=0.0))
        outs = []
        for _ in range(8):
            out = await session.extend(30, boundaries)
            outs.append((out.token_ids, out.text, out.end))
            if out.end != "boundary":
                break
        return outs

    streamed, walked = run(steps(streaming)), run(steps(plain))
    assert walked == streamed and len(streamed) >= 2
    assert plain.stats.by_kind["step"] == len(walked)
    assert run(steps(engine)) == walked  # the default when nobody watches live: plain
    plain.close()
    streaming.close()


def test_word_boundary_ends_the_step_before_the_word_and_carries_it_into_the_next(engine, llama):
    ids = prompt_ids(engine, "Describe the moon in three short sentences.")
    want_ids, want_text = greedy_direct(llama.url, ids, 40)
    word = "the" if " the" in want_text[1:] else want_text.split()[3]

    async def steps():
        session = await engine.start(ids, Sampling(temperature=0.0))
        outs = []
        while sum(len(o.token_ids) for o in outs) < 40:
            out = await session.extend(40 - sum(len(o.token_ids) for o in outs), Boundaries((), (word,)))
            outs.append(out)
            if out.end != "boundary":
                break
        return outs, session.pending

    outs, _ = run(steps())
    boundary_steps = [o for o in outs if o.end == "boundary"]
    assert boundary_steps, f"the greedy text has {word!r}: {want_text!r}"
    assert all(word not in o.text.split()[-1:] for o in boundary_steps)  # the word is not in the step that it ends
    for prev, nxt in zip(outs, outs[1:]):
        if prev.end == "boundary":
            assert nxt.text.lstrip().startswith(word)  # it starts the next step
    assert [t for o in outs for t in o.token_ids] == want_ids[: sum(len(o.token_ids) for o in outs)]


def test_probe_is_greedy_short_stops_at_the_box_and_leaves_the_session_unchanged(engine, llama):
    ids = prompt_ids(engine, "What is 12 + 30? Answer with a number.")
    probe_ids = engine.tokenize("\n**Final Answer**\n\nThe final answer is \\boxed{")

    async def go():
        session = await engine.start(ids, Sampling(temperature=0.0))
        first = await session.extend(12, Boundaries(("\n\n",), ()))
        n_before = session.n_tokens
        probe = await session.probe(probe_ids, 20)
        assert session.n_tokens == n_before
        second = await session.extend(12, Boundaries(("\n\n",), ()))
        return first, probe, second

    first, probe, second = run(go())
    # the probe changed nothing: the two steps equal one uninterrupted greedy run
    want_ids, _ = greedy_direct(llama.url, ids, len(first.token_ids) + len(second.token_ids))
    assert first.token_ids + second.token_ids == want_ids
    assert 1 <= len(probe.token_ids) <= 20
    assert all(lp <= 0 for lp in probe.logprobs) and len(probe.logprobs) == len(probe.token_ids)
    assert probe.prompt_tokens == len(probe_ids)
    # the same greedy continuation, asked directly, begins with the probe's tokens
    direct_ids, direct_text = greedy_direct(llama.url, ids + first.token_ids + probe_ids, 20)
    assert direct_ids[: len(probe.token_ids)] == probe.token_ids
    if "}" in direct_text:  # stopped at the closing brace, not 20 tokens later
        assert len(probe.token_ids) <= len(direct_ids)
        assert probe.text == direct_text[: len(probe.text)]


def test_probe_requests_never_ask_for_echo_or_prompt_logprobs(fault):
    eng = ServerEngine.connect(fault.url, backoff=0.05)
    result = run(agenerate_question(eng, "What is 2 + 2?", CodeStop(), max_new_tokens=40, probe_interval=1, boundaries=[" "], temperature=0.0))
    ids = fault.seen[0]["prompt"]  # the question's prompt, as the first step sent it
    probes = [b for b in fault.seen if b.get("stop") == ["}"] and "max_tokens" in b]
    assert probes and len(probes) >= len(result.probes) >= 1
    for body in probes:
        assert not body.get("echo") and "prompt_logprobs" not in body
        assert body["temperature"] == 0.0 and body["max_tokens"] <= 20 and body["logprobs"]
        assert isinstance(body["prompt"], list) and body["prompt"][: len(ids)] == ids  # token ids, same prefix
    eng.close()


def test_a_whole_question_runs_through_the_controller(engine):
    result = run(agenerate_question(engine, "What is 12 + 30?", CodeStop(), max_new_tokens=60, probe_interval=1, boundaries=[" "], temperature=0.0))
    assert result.engine == "server"
    assert result.probes and all(0 <= p.confidence <= 1 for p in result.probes)
    assert result.stop_reason in ("confident", "degenerate", "finished", "budget")
    assert result.tokens["reasoning"] == result.stop_position <= 60
    assert result.answer_text  # the forced (or own) answer


def test_many_concurrent_sessions_share_one_engine(engine):
    questions = [f"What is {i} + {i}?" for i in range(8)]

    async def many():
        return await asyncio.gather(
            *(agenerate_question(engine, q, Vanilla(), max_new_tokens=16, temperature=0.0) for q in questions)
        )

    results = run(many())
    assert len(results) == 8 and all(r.tokens["reasoning"] >= 1 for r in results)
    # the same greedy question alone gives the same tokens as under concurrency
    alone = run(agenerate_question(engine, questions[3], Vanilla(), max_new_tokens=16, temperature=0.0))
    assert alone.reasoning_text == results[3].reasoning_text


def test_rejected_token_id_prompts_fall_back_to_text(fault, engine):
    fault.mode = "reject_ids"
    eng = ServerEngine.connect(fault.url, backoff=0.05, stream_steps=True)  # llama-cpp-python has no native endpoint
    q = "Name a colour."
    got = run(agenerate_question(eng, q, Vanilla(), max_new_tokens=12, temperature=0.0))
    want = run(agenerate_question(engine, q, Vanilla(), max_new_tokens=12, temperature=0.0))
    assert eng.text_prompts and eng.stats.text_fallbacks == 1
    assert isinstance(fault.seen[-1]["prompt"], str)
    assert got.reasoning_text == want.reasoning_text
    eng.close()


def test_503_is_retried_and_a_stream_cut_midway_resumes_where_it_broke(fault, engine):
    eng = ServerEngine.connect(fault.url, backoff=0.05, stream_steps=True)
    q = "Describe the sea."
    want = run(agenerate_question(engine, q, Vanilla(), max_new_tokens=30, temperature=0.0))
    fault.mode = "status_once"
    got = run(agenerate_question(eng, q, Vanilla(), max_new_tokens=30, temperature=0.0))
    assert eng.stats.retries == 1 and got.reasoning_text == want.reasoning_text
    fault.mode = "drop_once"
    got = run(agenerate_question(eng, q, Vanilla(), max_new_tokens=30, temperature=0.0))
    assert eng.stats.retries == 2 and got.reasoning_text == want.reasoning_text
    eng.close()


def test_a_hanging_server_times_out_with_a_clear_error(fault):
    eng = ServerEngine.connect(fault.url, timeout=1.0, backoff=0.05)
    fault.mode = "hang"
    with pytest.raises(ServerTimeout, match="did not answer within 1 s"):
        run(agenerate_question(eng, "hi", Vanilla(), max_new_tokens=8))
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
    from codestop.engines.base import ContextTooLong

    with pytest.raises(ContextTooLong, match="context window is 2048"):
        run(agenerate_question(engine, "word " * 2500, Vanilla(), max_new_tokens=8))


def test_load_engine_hook_picks_the_server_engine(llama):
    from codestop.models import load_engine

    eng = load_engine(None, base_url=llama.url + "/v1")  # --base-url alone implies --engine server
    assert isinstance(eng, ServerEngine) and eng.model_name.endswith(".gguf")
    eng.close()
