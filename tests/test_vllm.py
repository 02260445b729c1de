"""The completions-server engine against a REAL vLLM (0.32, CPU build) serving SmolLM2-135M-Instruct
with prefix caching: the ``vllm_url`` fixture (tests/vllm_server.py) starts one, or reuses
``$CODESTOP_VLLM_URL``'s. Nothing stands in for vLLM: where a test needs to see or disturb the
requests, a recording proxy (tests/test_server_engine.py's ``FaultProxy``) relays them to it.

SmolLM2 decodes a few dozen tokens a second on a shared CPU, so every generation here is short.
Greedy decoding is exact on this server, so steps are compared with one direct request token for
token.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from harness import free_port
from llama_servers import FaultProxy
from vllm_server import prefix_cache_hits

from codestop import CodeStop, Vanilla
from codestop.api import agenerate_question
from codestop.config import DEFAULT_BOUNDARIES, GenerationConfig
from codestop.controller import Result, astream, score
from codestop.engines.server import ServerEngine
from codestop.errors import ServerError, ServerTimeout, ServerUnreachable
from codestop.families import FAMILIES, PROBE_PROMPT
from codestop.sampling import Sampling
from codestop.steps import IncrementalDecoder, StepRules, closing_brace_index

pytestmark = pytest.mark.slow

MAX_STOPS = 4  # vLLM 0.32 answers 400 to more
LIST_QUESTION = "List three fruits, one per line."  # greedy: "1. Banana\n2. Apple\n3. Grapefruit" and EOS
SHORT_QUESTION = "What is 2 + 2? Answer with the number."  # after "<think>\n": "\nThe answer is 4." and EOS


def run(coro):
    return asyncio.run(coro)


def root(url: str) -> str:
    return url.removesuffix("/v1")


@pytest.fixture(scope="module")
def proxy(vllm_url):
    """A recording relay to the real vLLM (``seen``: every completion request's body)."""
    relay = FaultProxy(root(vllm_url))
    yield relay
    relay.stop()


@pytest.fixture()
def recorder(proxy):
    proxy.seen.clear()
    proxy.mode = "pass"
    yield proxy
    proxy.mode = "pass"


@pytest.fixture(scope="module")
def engine(vllm_url):
    """The engine as a user gets it: no --tokenizer, vLLM's own /tokenize and /detokenize."""
    eng = ServerEngine.connect(vllm_url, backoff=0.05)
    yield eng
    eng.close()


def chat_ids(engine: ServerEngine, question: str, suffix: str = "") -> list[int]:
    return engine.tokenize(engine.chat_template([{"role": "user", "content": question}]) + suffix)


def greedy_direct(url: str, prompt_ids: list[int], n: int) -> tuple[list[int], str, list[float]]:
    """vLLM's own greedy continuation: ids (its EOS dropped, as a session drops it), text, logprobs."""
    r = httpx.post(url + "/completions", json={"prompt": prompt_ids, "max_tokens": n, "temperature": 0, "logprobs": 1,
                                               "return_token_ids": True}, timeout=120)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    ids, lps = list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])
    if choice["finish_reason"] == "stop" and choice["stop_reason"] is None:  # stopped at EOS, listed last
        ids, lps = ids[:-1], lps[:-1]
    return ids, choice["text"], lps


async def all_steps(session, max_tokens: int, rules: StepRules) -> list[tuple[list[int], str, str]]:
    """Steps until one ends otherwise than at a boundary or the tokens run out."""
    outs: list = []
    used = 0
    while used < max_tokens:
        out = await session.step(max_tokens - used, rules)
        outs.append((out.token_ids, out.text, out.end))
        used += len(out.token_ids)
        if out.end != "boundary":
            break
    return outs


def stop_counts(bodies: list[dict]) -> list[int]:
    return [len(b.get("stop") or []) for b in bodies]


# --------------------------------------------------------------------------------------------


def test_connect_reads_what_vllm_serves_and_its_tokenizer_matches_the_real_one(engine, tokenizer):
    assert engine.dialect.name == "vllm" and engine.context_window == 2048
    assert engine.model_name in engine.served_models
    sample = "<|im_start|>user\nWhat is 12 + 30? Wait, déjà vu.\n\n<|im_end|>"
    assert engine.tokenize(sample) == tokenizer.encode(sample, add_special_tokens=False)
    template = engine.chat_template([{"role": "user", "content": "hi"}])
    assert template.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in template
    health = run(engine.health())
    assert health["ok"] is True and health["upstream"] == "ok" and engine.model_name in health["models"]


def test_steps_plain_streamed_and_beyond_the_stop_cap_are_the_servers_own_greedy_tokens(recorder, vllm_url, tokenizer):
    """The same greedy run split at a newline and before a word three ways: plain requests with
    the stops server-side (kept with include_stop_str_in_output), streams, and more boundary
    words than a request may carry (the stream carries 4, the scanner finds the word itself)."""
    eng = ServerEngine.connect(recorder.url, tokenizer=tokenizer, backoff=0.05)
    ids = chat_ids(eng, LIST_QUESTION)
    want_ids, want_text, _ = greedy_direct(vllm_url, ids, 24)
    word = want_text.splitlines()[1].split()[1]  # "Apple": in the middle of the second line
    few = StepRules(("\n",), (word,))
    many = StepRules(("\n\n", "\n"), ("Wait", "But wait", "Alternatively", "Hmm", word))

    async def steps(live: bool, rules: StepRules) -> tuple[list, list[dict]]:
        recorder.seen.clear()
        session = await eng.start(ids, Sampling(temperature=0.0), live=live)
        return await all_steps(session, 24, rules), list(recorder.seen)

    plain, plain_bodies = run(steps(False, few))
    live, live_bodies = run(steps(True, few))
    capped, capped_bodies = run(steps(False, many))
    assert plain == live == capped
    assert [t for s in plain for t in s[0]] == want_ids and "".join(s[1] for s in plain) == want_text
    texts = [s[1] for s in plain]
    assert texts[0].endswith("\n") and plain[0][2] == "boundary"  # the separator is kept in its step
    at_word = next(i for i, s in enumerate(plain) if s[2] == "boundary" and not s[1].endswith("\n"))
    assert texts[at_word + 1].lstrip().startswith(word)  # the word starts the next step
    assert plain[-1][2] == "eos" and "<|im_end|>" not in "".join(texts)
    # what went to vLLM: token-id prompts, never more than 4 stops
    for body in plain_bodies + live_bodies + capped_bodies:
        assert isinstance(body["prompt"], list) and body["prompt"][: len(ids)] == ids
    assert max(stop_counts(plain_bodies + live_bodies + capped_bodies)) <= MAX_STOPS
    assert all(not b.get("stream") and b["stop"] == ["\n", word] and b["include_stop_str_in_output"] for b in plain_bodies)
    assert all(b["stream"] for b in live_bodies + capped_bodies)
    assert all(b["stop"] == ["\n\n", "\n", "Wait", "But wait"] for b in capped_bodies)
    # ids without logprobs, which slow vLLM down and only probes need
    assert all(b["return_token_ids"] is True and "logprobs" not in b for b in plain_bodies + live_bodies + capped_bodies)
    eng.close()


def test_the_reasoning_stream_asks_for_token_ids_and_only_probes_for_logprobs(recorder, tokenizer):
    """CoDE-Stop with overlapped probes: the one reasoning stream runs without logprobs (the ids
    come as ``token_ids``), each probe beside it with them; the run equals the same run with every
    request asking for logprobs (as before) token for token."""
    eng = ServerEngine.connect(recorder.url, tokenizer=tokenizer, backoff=0.05)
    never = CodeStop(r_min=1.0, r_max=1.0, tau=1e9)

    def ask() -> Result:
        return run(agenerate_question(eng, LIST_QUESTION, never, max_reasoning_tokens=24, probe_interval=4,
                                      boundaries=["\n"], temperature=0.0, probe_mode="overlapped"))

    result = ask()
    stream, *probes, answer = recorder.seen  # the stream first, the probes beside it, the answer once it is cut
    assert stream.get("stream") and len(probes) == len(result.probes) >= 1 and answer["max_tokens"] != probes[0]["max_tokens"]
    assert all(b["return_token_ids"] is True and "logprobs" not in b for b in (stream, answer))
    assert all(b["logprobs"] == 1 for b in probes)
    eng.dialect.step_ids = None  # the stream as it was: ids read from logprobs
    try:
        recorder.seen.clear()
        before = ask()
        assert all(b["logprobs"] == 1 for b in recorder.seen)
    finally:
        del eng.dialect.step_ids
    assert (before.reasoning_text, before.answer_text, before.tokens) == (result.reasoning_text, result.answer_text, result.tokens)
    assert [(p.position, p.text, p.confidence) for p in before.probes] == [(p.position, p.text, p.confidence) for p in result.probes]
    eng.close()


def test_a_probe_is_greedy_with_logprobs_and_leaves_the_session_unchanged(engine, vllm_url):
    ids = chat_ids(engine, "What is 12 + 30? Answer with a number.")
    probe_ids = engine.tokenize(PROBE_PROMPT)

    async def go():
        session = await engine.start(ids, Sampling(temperature=0.0))
        first = await session.step(6, StepRules())
        n_before = session.n_tokens
        probe = await session.probe(probe_ids, 12)
        assert session.n_tokens == n_before
        return first, probe

    first, probe = run(go())
    direct_ids, direct_text, direct_lps = greedy_direct(vllm_url, ids + first.token_ids + probe_ids, 12)
    n = len(probe.token_ids)
    assert probe.token_ids == direct_ids[:n] and probe.prompt_tokens == len(probe_ids)
    assert probe.logprobs == pytest.approx(direct_lps[:n], abs=0.05)
    if closing_brace_index(direct_text) is not None:  # the probe ends with the token that closes the box
        assert closing_brace_index(IncrementalDecoder(engine.detokenize, probe.token_ids).text) is not None
    scored = score(probe, len(first.token_ids), "mean", engine)
    assert 0.0 <= scored.confidence <= 1.0 and scored.answer and all(lp <= 0 for lp in scored.token_logprobs)


def test_probes_reuse_vllms_prefix_cache(engine, vllm_url):
    """Probes send the whole context again as token ids; vLLM's prefix cache serves it (its
    /metrics counter of cached prompt tokens grows by whole blocks)."""
    long_question = "Here are some numbers: " + ", ".join(str(i) for i in range(100, 140)) + ". What is the first one?"
    ids = chat_ids(engine, long_question)
    assert len(ids) > 128  # vLLM's CPU build caches whole blocks of 128 tokens
    probe_ids = engine.tokenize(PROBE_PROMPT)

    async def go() -> float:
        session = await engine.start(ids, Sampling(temperature=0.0))
        await session.step(2, StepRules())
        before = prefix_cache_hits(vllm_url)
        for _ in range(3):
            await session.probe(probe_ids, 2)
        return prefix_cache_hits(vllm_url) - before

    hits = run(go())
    assert hits >= 3 * 128, f"prefix cache hits grew by {hits} over 3 probes of a {len(ids)}-token context"


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_eos_never_reaches_the_text_with_a_thinking_family_and_no_tokenizer(vllm_url, live):
    """vLLM says no EOS when connecting; the engine learns it from the first answer that stops at
    it, before a scanner sees it, so "<|im_end|>" is in no reasoning, no answer, no live event."""
    eng = ServerEngine.connect(vllm_url, backoff=0.05)
    assert eng.eos_token_ids == frozenset()
    think = FAMILIES["think"]
    prompt = eng.chat_template([{"role": "user", "content": SHORT_QUESTION}]) + think.think_start + "\n"
    config = GenerationConfig(max_reasoning_tokens=24, probe_interval=4, boundaries=("\n",), temperature=0.0, live_text=live)

    async def go() -> tuple[Result, str]:
        shown = ""
        async for item in astream(eng, SHORT_QUESTION, CodeStop(), config, family=think, prompt=prompt):
            if isinstance(item, Result):
                return item, shown
            shown += item.text
        raise AssertionError("no result")

    result, shown = run(go())
    assert result.stop_reason == "unclosed_thinking" and "4" in result.reasoning_text  # it ended its turn (EOS) itself
    assert eng.eos_token_ids == frozenset({2})  # SmolLM2's <|im_end|>
    for text in (result.reasoning_text, result.answer_text, shown):
        assert "<|im_end|>" not in text
    assert result.answer == "4"
    eng.close()


def test_no_request_carries_more_than_four_stops_whatever_the_boundaries(recorder):
    """The issue's 502: the default boundaries and a thinking family's end tag are five stop
    strings, and vLLM refuses a list of five. With ten boundaries a whole CoDE-Stop question runs,
    probes and forced answer included, and no request carries more than four."""
    eng = ServerEngine.connect(recorder.url, backoff=0.05)
    boundaries = [*DEFAULT_BOUNDARIES, "\n", "Hmm", "Let me", "Actually", "So", "Therefore"]
    result = run(agenerate_question(eng, "What is 3 + 4?", CodeStop(), family="think", max_reasoning_tokens=16, probe_interval=6,
                                    boundaries=boundaries, temperature=0.0))
    assert result.tokens["reasoning"] >= 1 and result.answer_text
    bodies = list(recorder.seen)
    assert bodies and max(stop_counts(bodies)) <= MAX_STOPS
    # a probe or the forced answer stops at the box's "}"; a reasoning step at the end tag first
    assert all(b["stop"] == ["}"] or b["stop"][0] == "</think>" for b in bodies)
    assert any(b["stop"][0] == "</think>" for b in bodies) and any(b["stop"] == ["}"] for b in bodies)
    eng.close()


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_a_hung_vllm_is_one_504_after_the_timeout(recorder, tokenizer, live):
    """The tokenizer is local here, so the one request that hangs is the step (plain or streamed);
    tests/test_server_engine.py hangs the server's tokenizer and template too."""
    eng = ServerEngine.connect(recorder.url, tokenizer=tokenizer, timeout=1.0, backoff=0.05)
    recorder.mode = "hang_all"
    t0 = time.monotonic()
    with pytest.raises(ServerTimeout, match="stayed silent for 1 s") as caught:
        run(agenerate_question(eng, "hi", Vanilla(), max_reasoning_tokens=8, live_text=live))
    assert time.monotonic() - t0 < 1.9 and caught.value.status == 504
    eng.close()


def test_an_engine_started_before_vllm_connects_once_it_answers(vllm_url):
    """As under an orchestrator: the proxy's engine starts while its upstream is still starting.
    Health says "starting" and questions get a clear 503 until the server answers; then it works."""
    port = free_port()
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        ServerEngine.connect(f"http://127.0.0.1:{port}/v1")  # waiting (the default): an error now
    eng = ServerEngine.connect(f"http://127.0.0.1:{port}/v1", wait=False, backoff=0.05)
    health = run(eng.health())
    assert (health["ok"], health["upstream"]) == (False, "starting") and "ConnectError" in health["error"]
    with pytest.raises(ServerError, match="not ready yet") as caught:
        run(agenerate_question(eng, SHORT_QUESTION, Vanilla(), max_reasoning_tokens=4))
    assert caught.value.status == 503
    upstream = FaultProxy(root(vllm_url), port=port)  # the server comes up on that port
    try:
        time.sleep(1.1)  # attempts are at most one a second
        health = run(eng.health())
        assert health["ok"] is True and health["upstream"] == "ok" and eng.dialect.name == "vllm"
        assert eng.served_models == health["models"] and eng.model_name in eng.served_models
        result = run(agenerate_question(eng, SHORT_QUESTION, Vanilla(), max_reasoning_tokens=4, temperature=0.0))
        assert result.tokens["reasoning"] >= 1
    finally:
        upstream.stop()
        eng.close()
