"""Overlapped probing (``probe_mode="overlapped"``) against REAL servers: a llama.cpp server
(xllamacpp's ``llama-server``) and vLLM 0.32 (the ``vllm_url`` fixture), both serving SmolLM2-135M.

The reasoning streams on past each boundary while the boundary's probe runs as its own request;
at a stop the stream is cancelled and the session is cut back to the boundary. So on the same
greedy question the two modes must give the same reasoning, probes, stop and answer, and the only
differences are the requests sent (one reasoning request instead of one per step) and the tokens
generated past the stop (``overrun``).

The llama.cpp server runs with ``n_ubatch=1``: it then computes every token alone, so its greedy
output does not depend on what else shares a batch or on which slot's prompt cache a request
reuses (with the default batch, a probe's prefill of a few dozen tokens in one batch gives the
cached keys slightly different numerics and can change a later greedy token in either mode).

vLLM 0.32's CPU build has no batch-invariant mode (``VLLM_BATCH_INVARIANT`` overrides CUDA, ROCm
and XPU kernels only), and its greedy tokens do depend on what shares a batch: measured here, the
same probe answered alone was identical in 4 of 4 tries, logprobs included, and beside a streaming
request diverged at the same character in 4 of 4. Nor do a stream and the same request resumed
from a cut agree on AVX-512 machines (the resumed one prefills what the stream decoded). So greedy
equality of the two modes is shown on a vLLM that computes every token alone
(``vllm_server.SERIAL_ARGS``: one request per forward pass, one token per prefill pass; a probe
waits for the stream instead of joining its batch), and on the shared server, where probes do run beside
the stream, the test asserts what the batching cannot change: the requests, the reasoning up to
the first probe, where the probes are, and that the stop is the policy's own decision on the
probes the server returned.

Probes come at every word (a space boundary) once 16 reasoning tokens have passed since the last
one, so every case probes whatever the model writes (default boundaries need a blank line, which
vLLM's greedy SmolLM2 did not write in 160 tokens on the first question).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from harness import scrape
from llama_servers import LlamaServer

from codestop.config import GenerationConfig
from codestop.controller import Result, agenerate
from codestop.engines.server import ServerEngine
from codestop.families import get_family
from codestop.policies import make_policy

pytestmark = pytest.mark.slow

QUESTIONS = [
    "A baker makes 24 rolls in the morning and 18 in the afternoon. She sells 30 of them. How many are left?",
    "Tom has 5 boxes with 12 pencils each. He gives away 17 pencils. How many pencils does he keep?",
]
STORY = "Write a long story about a dragon and a knight, in many short paragraphs."
# tau 1: CoDE-Stop stops early here on a degenerate step (the stream has run ahead of the stop)
POLICY = {"method": "codestop", "tau": 1.0}
# DEER at a threshold any probe passes: a stop at the first probe, whatever the model says
STOP_AT_FIRST_PROBE = {"method": "deer", "threshold": 0.01}
CASES = [(q, POLICY) for q in QUESTIONS] + [(STORY, STOP_AT_FIRST_PROBE)]
MAX_REASONING_TOKENS = 160
# on the vLLM that computes every token alone, sequential mode's step per word costs ~50 s a case
# (each step prefills up to 31 tokens one pass at a time): one question (CoDE-Stop's degenerate
# stop, near 50 tokens on either question) and the story (a stop at the first probe)
SERIAL_CASES = [CASES[0], CASES[2]]
BOUNDARIES = (" ", "\n")  # whatever the model writes, it writes spaces
PROBE_INTERVAL = 16


def signature(r: Result) -> tuple:
    return (r.reasoning_text, r.stop_reason, r.tokens["reasoning"], r.answer, r.answer_text,
            [(p.position, p.answer, round(p.confidence, 6)) for p in r.probes], r.tokens["reasoning"], r.tokens["probe"])


def both_modes(engine: ServerEngine, question: str, policy: dict) -> dict[str, tuple[Result, dict[str, int]]]:
    out = {}
    for mode in ("sequential", "overlapped"):
        before = dict(engine.transport.stats.by_kind)
        config = GenerationConfig(max_reasoning_tokens=MAX_REASONING_TOKENS, boundaries=BOUNDARIES, probe_interval=PROBE_INTERVAL,
                                  temperature=0, probe_mode=mode)
        result = asyncio.run(agenerate(engine, question, make_policy(**policy), config))
        sent = {kind: engine.transport.stats.by_kind.get(kind, 0) - before.get(kind, 0) for kind in ("step", "probe", "answer")}
        out[mode] = (result, sent)
    return out


def check_requests(runs: dict[str, tuple[Result, dict[str, int]]]) -> None:
    """What the two modes send, whatever the server's numerics."""
    for mode, (result, sent) in runs.items():
        assert result.probes, f"{mode}: no probe in {result.tokens['reasoning']} reasoning tokens: {result.reasoning_text!r}"
        assert sent["probe"] == len(result.probes) and sent["answer"] >= 1, (mode, sent)
        # the stop is the policy's own decision on the probes this run got back
        policy = make_policy(**result.policy)
        decisions = [d for d in map(policy.start().update, result.probes) if d.stop]
        if result.stop_reason in ("finished", "max_reasoning_tokens"):
            assert not decisions, (mode, decisions)
        else:
            assert decisions and decisions[0].reason == result.stop_reason and result.tokens["reasoning"] == result.probes[-1].position
    (seq, seq_sent), (ovl, ovl_sent) = runs["sequential"], runs["overlapped"]
    assert seq.tokens["overrun"] == 0
    assert ovl_sent["step"] == 1  # one reasoning request for the whole chain of thought
    assert seq_sent["step"] >= len(seq.probes)  # a new request after every probe
    if ovl.stop_reason not in ("finished", "max_reasoning_tokens"):
        assert ovl.tokens["overrun"] > 0  # the stream had gone on while the stopping probe ran


def check_same(runs: dict[str, tuple[Result, dict[str, int]]]) -> None:
    """Greedy equality: on a server whose numerics do not depend on what shares a batch."""
    check_requests(runs)
    (seq, _), (ovl, _) = runs["sequential"], runs["overlapped"]
    assert signature(ovl) == signature(seq)
    if seq.stop_reason not in ("finished", "max_reasoning_tokens"):
        assert ovl.cost_tokens == seq.cost_tokens + ovl.tokens["overrun"]


def wait_idle(read_running, seconds: float = 5.0) -> float:
    """The upstream's own count of running requests, polled until it is 0 or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        running = read_running()
        if running == 0 or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(smollm2_path):
    server = LlamaServer(smollm2_path, slots=2, ubatch=1).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def llama_engine(llama):
    eng = ServerEngine.connect(llama.url + "/v1")
    yield eng
    eng.close()


@pytest.mark.parametrize(("question", "policy"), CASES)
def test_llamacpp_overlapped_equals_sequential(llama_engine, question, policy):
    check_same(both_modes(llama_engine, question, policy))


def check_stop_cancels_the_stream(engine: ServerEngine, read_running) -> None:
    """A stop long before the token cap: the cancelled stream must not keep the server busy (it
    would for the rest of ~1500 tokens, over 10 s, if the request were left running).

    Probes at words, as in both_modes: on an AMX host vLLM's greedy SmolLM2 wrote this story as one
    paragraph repeating a sentence, so the default (blank-line) boundaries never came, no probe ran
    and the stream went on to the cap."""
    config = GenerationConfig(max_reasoning_tokens=1500, boundaries=BOUNDARIES, probe_interval=PROBE_INTERVAL, temperature=0)
    result = asyncio.run(agenerate(engine, STORY, make_policy(**STOP_AT_FIRST_PROBE), config))
    assert result.probes, f"no probe in {result.tokens['reasoning']} reasoning tokens: {result.reasoning_text[:300]!r}"
    assert result.stop_reason == "threshold" and result.tokens["reasoning"] < 500 and result.tokens["overrun"] > 0
    assert wait_idle(read_running) == 0


def test_llamacpp_stop_cancels_the_stream(llama, llama_engine):
    check_stop_cancels_the_stream(llama_engine, lambda: scrape(llama.url, "llamacpp:requests_processing"))


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------


def vllm_running(url: str) -> float:
    return scrape(url, "vllm:num_requests_running")


@pytest.fixture(scope="module")
def vllm_engine(vllm_url):
    eng = ServerEngine.connect(vllm_url)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def vllm_serial_engine(vllm_serial_url):
    eng = ServerEngine.connect(vllm_serial_url)
    yield eng
    eng.close()


@pytest.mark.parametrize(("question", "policy"), SERIAL_CASES)
def test_vllm_one_request_per_batch_overlapped_equals_sequential(vllm_serial_engine, question, policy):
    check_same(both_modes(vllm_serial_engine, question, policy))


def greedy_alone(engine: ServerEngine, question: str, n_tokens: int) -> str:
    """The server's own greedy text for ``question``'s prompt (as the controller builds it), one
    request alone, ``n_tokens`` long."""
    ids = engine.tokenize(get_family(None, engine).build_prompt(engine, question))
    if engine.bos_token_id is not None and ids[:1] != [engine.bos_token_id]:
        ids = [engine.bos_token_id, *ids]
    body = {"model": engine.model_name, "prompt": ids, "max_tokens": n_tokens, "temperature": 0}
    return httpx.post(engine.base_url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]


@pytest.mark.parametrize(("question", "policy"), CASES)
def test_vllm_overlapped_probes_beside_the_stream(vllm_engine, question, policy):
    """On a shared vLLM a probe joins the stream's batch, so its greedy tokens, and the stream's
    after it, may differ from sequential mode's, and sequential mode's own steps are resumed
    requests (other greedy tokens on AVX-512 machines; see docs/serving.md). What the server
    determines exactly: overlapped mode's one stream, before its first probe, is the server's
    greedy text for the prompt asked alone."""
    runs = both_modes(vllm_engine, question, policy)
    check_requests(runs)
    ovl = runs["overlapped"][0]
    alone = greedy_alone(vllm_engine, question, ovl.probes[0].position)
    assert alone and ovl.reasoning_text.startswith(alone), (alone, ovl.reasoning_text)


def test_vllm_stop_cancels_the_stream(vllm_url, vllm_engine):
    check_stop_cancels_the_stream(vllm_engine, lambda: vllm_running(vllm_url))
