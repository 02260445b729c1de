"""The same tokens through an in-process session and a server session give the same steps.

A toy "model" writes a fixed script of byte pieces (so every split is chosen: a word over two
tokens, a character over two tokens); an in-process engine samples it through ``LocalSession``,
and a scripted completions server generates it for ``ServerSession`` over ``httpx.MockTransport``,
in each server dialect (vLLM, SGLang, llama.cpp; plain requests with server-side stop strings, and
streams), with the server's own tokenizer too. Steps (token ids, text, end, carried word), the
text shown live, probes (tokens and log-probabilities) and the forced answer must all agree.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import pytest
from scripted import ScriptedEngine, ToyTokenizer

from codestop.engines.server import HFTokens, RemoteTokens, ServerEngine, ServerOptions, Upstream, dialect_for
from codestop.errors import ServerError
from codestop.sampling import Sampling
from codestop.steps import StepRules

EOS = 0
CONFIDENCE = 0.9  # every token's probability, on both sides
SNOWMAN = "\u2603".encode()  # 3 bytes
RULES = StepRules(separators=("\n\n",), words=("Wait", "But wait", "Alternatively"), stop_texts=("</think>",))
FEW_RULES = StepRules(separators=("\n\n",), words=("Wait",), stop_texts=("</think>",))  # 3 stop strings: fit any server
VLLM_MAX_STOPS = 4  # vLLM 0.32 answers 400 to a longer stop list
ANSWER_RULES = StepRules(close_box=True, greedy=True)


class ToyModel:
    """Writes ``script`` after ``prompt``; after ``box`` (a probe prompt or the forced answer) it
    writes ``answer``; anything else ends with EOS. That one token's probability is ``CONFIDENCE``."""

    def __init__(self, tok: ToyTokenizer, prompt: list[int], script: list[int], box: list[int], answer: list[int]) -> None:
        self.tok, self.prompt, self.script, self.box, self.answer = tok, prompt, script, box, answer

    def next(self, ids: Sequence[int]) -> int:
        gen = list(ids[len(self.prompt) :])
        if gen == self.script[: len(gen)]:
            return self.script[len(gen)] if len(gen) < len(self.script) else EOS
        for k in range(len(gen) - len(self.box), -1, -1):  # the last box opened after some of the script
            if gen[k : k + len(self.box)] == self.box:
                j = len(gen) - k - len(self.box)
                return self.answer[j] if j < len(self.answer) else EOS
        return EOS

    logprob = math.log(CONFIDENCE)


# --------------------------------------------------------------------------------------------
# The in-process side: the scripted engine (tests/scripted.py) on the toy model
# --------------------------------------------------------------------------------------------


def local_engine(model: ToyModel) -> ScriptedEngine:
    return ScriptedEngine(model.tok, confidence=CONFIDENCE, next_token=lambda ids, _prompt_len: model.next(ids))


# --------------------------------------------------------------------------------------------
# The server side: a scripted completions server in each dialect
# --------------------------------------------------------------------------------------------


class ToyServer:
    """Generates with the toy model as vLLM, SGLang or llama.cpp would answer: stop strings matched
    in the generated text (kept by vLLM and SGLang when asked; llama.cpp's native endpoint trims the
    text and drops the stop word's probabilities), EOS listed, streams one event per token."""

    def __init__(self, model: ToyModel, dialect: str) -> None:
        self.model, self.dialect = model, dialect
        self.max_stops = VLLM_MAX_STOPS if dialect == "vllm" else None
        self.requests: list[tuple[str, dict]] = []
        self.sync_requests: list[str] = []

    def transports(self) -> tuple[httpx.MockTransport, httpx.MockTransport]:
        """(async, sync): the sync one records what goes through the blocking client."""

        def sync(request: httpx.Request) -> httpx.Response:
            self.sync_requests.append(request.url.path)
            return self(request)

        return httpx.MockTransport(self), httpx.MockTransport(sync)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, tok = request.url.path, self.model.tok
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "toy", "owned_by": self.dialect, "max_model_len": 4096}]})
        body = json.loads(request.content)
        self.requests.append((path, body))
        if path == "/tokenize":  # llama.cpp, with_pieces
            ids = tok.encode(body["content"])
            return httpx.Response(200, json={"tokens": [{"id": i, "piece": list(tok.pieces[i])} for i in ids]})
        if path == "/detokenize":
            return httpx.Response(200, json={"content": tok.decode(body["tokens"])})
        stops = body.get("stop") or []
        if self.max_stops is not None and len(stops) > self.max_stops:  # vLLM's own answer
            msg = f"List should have at most {self.max_stops} items after validation, not {len(stops)}"
            return httpx.Response(400, json={"error": {"message": msg, "type": "Bad Request", "param": "body.stop", "code": 400}})
        prompt = body["prompt"] if isinstance(body["prompt"], list) else tok.encode(body["prompt"])
        out, finish, matched = self.generate(prompt, body.get("max_tokens") or body["n_predict"], body.get("stop") or [])
        if path == "/completion":
            assert self.dialect == "llamacpp" and not body.get("stream")
            return httpx.Response(200, json=self.native(out, matched))
        assert path == "/v1/completions", path
        if body.get("stream"):
            events = [self.choice(out[i : i + 1], finish if i == len(out) - 1 else None, matched, body) for i in range(len(out))]
            sse = "".join(f"data: {json.dumps({'object': 'text_completion', 'choices': [c]})}\n\n" for c in events)
            return httpx.Response(200, content=(sse + "data: [DONE]\n\n").encode(), headers={"content-type": "text/event-stream"})
        assert self.dialect != "llamacpp", "llama.cpp steps and probes are native or streamed"
        return httpx.Response(200, json={"object": "text_completion", "model": "toy", "choices": [self.choice(out, finish, matched, body)]})

    def generate(self, prompt: list[int], n: int, stops: list[str]) -> tuple[list[int], str, str | int | None]:
        out: list[int] = []
        for _ in range(n):
            out.append(self.model.next(prompt + out))
            if out[-1] == EOS:
                return out, "stop", EOS
            text = self.model.tok.decode(out)
            for s in stops:
                if s in text:
                    return out, "stop", s
        return out, "length", None

    def choice(self, out: list[int], finish: str | None, matched: str | int | None, body: dict) -> dict:
        """As the real servers answer: logprobs only when asked, ``token_ids`` with ``return_token_ids``."""
        tok, lp = self.model.tok, self.model.logprob
        text = tok.decode([t for t in out if t != EOS])
        c: dict = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if body.get("return_token_ids"):
            c["token_ids"] = out
        if self.dialect == "vllm":  # return_tokens_as_token_ids; the matched stop string as stop_reason
            if body.get("logprobs"):
                c["logprobs"] = {"tokens": [f"token_id:{t}" for t in out], "token_logprobs": [lp] * len(out),
                                 "text_offset": [0] * len(out), "top_logprobs": [{f"token_id:{t}": lp} for t in out]}
            c["stop_reason"] = matched if finish and isinstance(matched, str) else None
        elif self.dialect == "sglang":  # text-only logprob tokens; token_ids; matched_stop (a string, or EOS's id)
            if body.get("logprobs"):
                c["logprobs"] = {"text_offset": [-1] * len(out), "token_logprobs": [lp] * len(out),
                                 "tokens": [tok.decode([t]) for t in out], "top_logprobs": [{tok.decode([t]): lp} for t in out]}
            c["matched_stop"] = matched if finish else None
        else:  # llama.cpp's chat-format logprobs with ids and bytes
            c["logprobs"] = {"content": [{"id": t, "token": tok.decode([t]), "bytes": list(tok.pieces[t]), "logprob": lp, "top_logprobs": []} for t in out]}
        return c

    def native(self, out: list[int], matched: str | int | None) -> dict:
        tok = self.model.tok
        if matched == EOS:
            out = out[:-1]  # (not listed here, so the session's "stop without a stop string" path runs)
        word = matched if isinstance(matched, str) else ""
        probs = out[: len(out) - len(tok.encode(word))] if word else out
        text = tok.decode(out)
        return {
            "content": text[: text.index(word)] if word else text,
            "tokens": out,
            "completion_probabilities": [
                {"id": t, "token": tok.decode([t]), "bytes": list(tok.pieces[t]), "logprob": self.model.logprob, "top_logprobs": []}
                for t in probs
            ],
            "stop": True,
            "stop_type": "word" if word else "eos" if matched == EOS else "limit",
            "stopping_word": word,
        }


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    script: list[str | bytes]  # pieces after the prompt; "<eos>" is EOS
    answer: list[str | bytes]  # what the model writes after "\boxed{" (a probe, the forced answer)
    budget: int = 99


CASES = [
    Case("blank line separator", ["So", " x = 5.", "\n\n", "Next", " step.", "\n\n", "Done", "<eos>"], ["4", "2}"]),
    Case("Wait split across two tokens", ["x = 5. ", "Wa", "it", ",", " no", ".\n\n", "ok", "<eos>"], ["7}"]),
    Case("Waiting is no boundary", ["I am", " Wait", "ing", " here", "\n\n", "then", " Wait", " again", "<eos>"], ["1", "}"]),
    Case("a character split across tokens", [b"snow " + SNOWMAN[:2], SNOWMAN[2:] + b" man", "\n\n", "cold", "<eos>"],
         [b"x" + SNOWMAN[:1], SNOWMAN[1:] + b"}"]),
    Case("</think> stop text", ["done", " Wait", ",", " sure", "</th", "ink>", "more"], ["\\frac{1", "}{2", "}", "}"]),
    Case("EOS ends the reasoning", ["short", "<eos>"], ["5", "}"]),
    Case("the budget ends a step", ["a", " b", " c", " Wait", " d", " e", " f", " g", "<eos>"], ["3}"], budget=6),
]

# (server dialect, live: streamed steps, the server's own tokenizer, the step rules). A step is
# plain unless live or its 5 stop strings exceed the engine's cap of 4 (then streamed: the words
# that do not fit are found client-side)
MODES = [
    ("vllm", False, False, FEW_RULES), ("vllm", False, False, RULES), ("vllm", True, False, RULES),
    ("sglang", False, False, FEW_RULES), ("sglang", False, False, RULES), ("sglang", True, False, RULES),
    ("llamacpp", False, False, FEW_RULES), ("llamacpp", False, False, RULES), ("llamacpp", True, False, RULES),
    ("llamacpp", False, True, FEW_RULES), ("llamacpp", True, True, RULES),
]
MODE_IDS = [f"{d}-{'live' if s else 'plain'}-{'3' if r is FEW_RULES else '5'}stops{'-remote-tokens' if t else ''}" for d, s, t, r in MODES]


def build(case: Case) -> tuple[ToyModel, list[int], list[int]]:
    tok = ToyTokenizer()
    prompt = tok.ids("Q:", " 2+3?", "\n")
    script = [EOS if p == "<eos>" else tok.ids(p)[0] for p in case.script]
    box = tok.ids("\n", "\\boxed{")
    for p in ["Wait", "}", "</think>", "\n\n"]:  # so the server's stop strings tokenize into known pieces
        tok.encode(p)
    return ToyModel(tok, prompt, script, box, tok.ids(*case.answer)), prompt, box


async def run_question(engine, prompt: list[int], box: list[int], budget: int, live: bool, rules: StepRules = RULES) -> list[dict]:
    """The controller's loop, short: steps to the end with a probe after each, then a forced answer."""
    session = await engine.start(prompt, Sampling(temperature=0.0), live=live)
    out: list[dict] = []
    used = 0
    while True:
        shown, step = [], None
        async for item in session.extend(budget - used, rules):
            if isinstance(item, str):
                shown.append(item)
            else:
                step = item
        probe = await session.probe(box, 20)
        out.append({"ids": step.token_ids, "text": step.text, "end": step.end, "carry": list(session.pending),
                    "shown": "".join(shown), "probe": probe.token_ids, "probe_lps": [round(x, 5) for x in probe.logprobs]})
        used += len(step.token_ids)
        if step.end != "boundary" or used >= budget:
            break
    await session.append(box)
    answer = [item async for item in session.extend(30, ANSWER_RULES)]
    out.append({"answer": answer[-1].token_ids, "answer_text": answer[-1].text, "answer_end": answer[-1].end})
    await session.close()
    return out


def server_engine(model: ToyModel, dialect: str, remote: bool, **options) -> tuple[ServerEngine, ToyServer]:
    server = ToyServer(model, dialect)
    transport, sync_transport = server.transports()
    tokens = RemoteTokens(httpx.Client(transport=sync_transport), "http://toy", "toy") if remote else HFTokens(model.tok, "toy")
    eng = ServerEngine("http://toy", Upstream("toy", dialect_for(dialect), tokens, window=4096, eos=frozenset({EOS})),
                       ServerOptions(backoff=0.0, transport=transport, **options))
    return eng, server


@pytest.mark.parametrize("dialect,live,remote,rules", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_server_steps_equal_local_steps(case: Case, dialect: str, live: bool, remote: bool, rules: StepRules):
    model, prompt, box = build(case)
    local = asyncio.run(run_question(local_engine(model), prompt, box, case.budget, live, rules))
    eng, server = server_engine(model, dialect, remote)
    got = asyncio.run(run_question(eng, prompt, box, case.budget, live, rules))
    assert got == local
    assert all(step["shown"] == step["text"] for step in got[:-1])  # the live text is the step's text
    assert not server.sync_requests  # nothing blocking: unknown pieces were fetched with the async client
    def reasoning(prompt: list[int]) -> bool:  # not a probe, not the forced answer
        return not any(prompt[k : k + len(box)] == box for k in range(len(prompt)))

    steps = [body for path, body in server.requests if "prompt" in body and reasoning(body["prompt"])]
    streamed = live or rules is RULES
    assert steps and all(bool(body.get("stream")) == streamed for body in steps)  # live or too many stops: streamed
    assert all(len(body.get("stop") or []) <= VLLM_MAX_STOPS for _, body in server.requests)


def test_a_plain_step_is_one_request_when_no_stop_string_misleads():
    """With server-side stops, a step costs one request; "Waiting" (a stop string that is no
    boundary) costs one more, not a wrong end."""
    model, prompt, _ = build(CASES[2])
    eng, server = server_engine(model, "vllm", False)

    async def go():
        session = await eng.start(prompt, Sampling(temperature=0.0))
        return [item async for item in session.extend(99, FEW_RULES)][-1]

    step = asyncio.run(go())
    assert step.text == "I am Waiting here\n\n" and step.end == "boundary"
    steps = [b for p, b in server.requests if b.get("stop")]
    assert len(steps) == 2 and steps[0]["stop"] == ["</think>", "\n\n", "Wait"] and not steps[0].get("stream")
    assert steps[0]["include_stop_str_in_output"] is True and steps[0]["return_token_ids"] is True and "logprobs" not in steps[0]


@pytest.mark.parametrize("max_stops", [1, 2, 4])
def test_boundary_words_beyond_the_stop_cap_are_found_client_side(max_stops: int):
    """More boundaries than a request may carry: the stop texts first, then separators, then words
    up to the cap; the step is streamed and the scanner finds the rest, with the same steps."""
    case = Case("words beyond the cap", ["So", " x", ".", " Alternatively", ",", " y", ".\n\n", "But", " wait", ",", " z", "<eos>"], ["3}"])
    model, prompt, box = build(case)
    local = asyncio.run(run_question(local_engine(model), prompt, box, 99, False))
    eng, server = server_engine(model, "vllm", False, max_stops=max_stops)
    got = asyncio.run(run_question(eng, prompt, box, 99, False))
    assert got == local and [s["text"] for s in got[:-1]] == ["So x.", " Alternatively, y.\n\n", "But wait, z"]
    steps = [b for _, b in server.requests if b["max_tokens"] > 30]
    assert steps and all(b["stream"] is True and b["stop"] == ["</think>", "\n\n", "Wait", "But wait"][:max_stops] for b in steps)
    assert all(len(b.get("stop") or []) <= max_stops for _, b in server.requests)


def test_a_plain_request_asks_for_a_bounded_number_of_tokens():
    """A plain answer is silent until done: it asks for at most PLAIN_REQUEST_TOKENS, and a longer
    step continues with the next request, so a healthy server never looks hung."""
    case = Case("long step", ["a"] * 40 + ["<eos>"], ["1}"])
    model, prompt, _ = build(case)
    eng, server = server_engine(model, "vllm", False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("codestop.engines.server.dialects.PLAIN_REQUEST_TOKENS", 16)

        async def go():
            session = await eng.start(prompt, Sampling(temperature=0.0))
            return [item async for item in session.extend(99, FEW_RULES)][-1]

        step = asyncio.run(go())
    assert step.text == "a" * 40 and step.end == "eos"
    assert [b["max_tokens"] for _, b in server.requests] == [16, 16, 16] and not any(b.get("stream") for _, b in server.requests)


def no_progress_engine(answer: dict) -> tuple[ServerEngine, ToyTokenizer, list[dict]]:
    """A server engine whose (scripted) server answers every request with ``answer``, and the
    requests it got."""
    calls: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        data = {"choices": [{"index": 0, **answer}]}
        if calls[-1].get("stream"):
            return httpx.Response(200, text=f"data: {json.dumps(data)}\n\ndata: [DONE]\n\n", headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=data)

    tok = ToyTokenizer()
    eng = ServerEngine("http://toy", Upstream("toy", dialect_for("vllm"), HFTokens(tok, "toy"), eos=frozenset({EOS})),
                       ServerOptions(retries=2, backoff=0.0, transport=httpx.MockTransport(handler)))
    return eng, tok, calls


def test_a_length_finish_without_tokens_ends_the_step_as_length():
    """The server's budget ended with no token to show (llama.cpp withholds an unfinished UTF-8
    character's tokens): an answer, asked once, not a failure."""
    eng, tok, calls = no_progress_engine({"finish_reason": "length", "text": "", "logprobs": {"tokens": [], "token_logprobs": []}})

    async def go():
        session = await eng.start(tok.ids("hi"), Sampling())
        return [item async for item in session.extend(50, RULES)]

    step = asyncio.run(asyncio.wait_for(go(), 10))[-1]
    assert step.end == "length" and step.token_ids == [] and len(calls) == 1
    probe = asyncio.run(asyncio.wait_for(_probe(eng, tok), 10))
    assert probe.token_ids == [] and len(calls) == 2


def test_a_request_that_makes_no_progress_is_retried_a_few_times_then_an_error():
    eng, tok, calls = no_progress_engine({"finish_reason": None, "text": "", "logprobs": {"tokens": [], "token_logprobs": []}})

    async def go():
        session = await eng.start(tok.ids("hi"), Sampling())
        return [item async for item in session.extend(50, RULES)]

    with pytest.raises(ServerError, match="no new tokens 3 times in a row"):
        asyncio.run(asyncio.wait_for(go(), 10))
    assert len(calls) == 3  # the first request and 2 retries, not forever
    with pytest.raises(ServerError, match="no new tokens"):
        asyncio.run(asyncio.wait_for(_probe(eng, tok), 10))


async def _probe(eng: ServerEngine, tok: ToyTokenizer):
    session = await eng.start(tok.ids("hi"), Sampling())
    return await session.probe(tok.ids("\\boxed{"), 20)


def test_remote_tokenizer_calls_run_in_a_worker_thread_unless_cached():
    model, _, _ = build(CASES[0])
    remote, server = server_engine(model, "llamacpp", True)
    local, _ = server_engine(model, "llamacpp", False)

    def tokenize(engine: ServerEngine, text: str) -> tuple[list[int], bool]:
        """The ids, and whether they were computed on the event loop's thread."""
        return engine.tokens.tokenize(text), threading.current_thread() is threading.main_thread()

    ids, on_loop = asyncio.run(remote.run_tokenizer(tokenize, remote, "hi there"))
    assert not on_loop and len(server.sync_requests) == 1  # not cached: a blocking HTTP call, in a worker thread
    again, on_loop = asyncio.run(remote.run_tokenizer(tokenize, remote, "hi there"))
    assert again == ids and on_loop and len(server.sync_requests) == 1  # cached: answered on the loop, no call, no thread
    assert asyncio.run(local.run_tokenizer(tokenize, local, "hi there")) == (ids, True)  # a local tokenizer never blocks
