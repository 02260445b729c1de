"""Agents' requests (``tools``, ``tool_choice``, ``response_format``) through ``codestop serve`` in
front of a REAL vLLM with tool-call parsing: Qwen2.5-Coder-0.5B-Instruct (the preset, converted to
a Hugging Face directory; the ``vllm_tools_url`` fixture starts one with ``--enable-auto-tool-choice
--tool-call-parser hermes``, or reuses ``$CODESTOP_VLLM_TOOLS_URL``). The upstream's chat endpoint
parses the tool calls and enforces the schema; these tests check that what comes back through the
proxy is that, under the proxy's id, with codestop's reasoning before it.

The 0.5B model is an instruct model, not a reasoning model: under ``tool_choice: "auto"`` it writes
the call's JSON without the ``<tool_call>`` tags the hermes parser looks for, so the tool-call tests
name the function (``tool_choice: {"type": "function", ...}``: vLLM then constrains the arguments to
the tool's schema). The tests that need a thinking block ask for the ``think`` family (the proxy
opens ``<think>``) and stop it at 12 reasoning tokens, so the answer phase continues a reasoning
codestop cut. Everything is greedy; the CPU build needs 10-30 s per request. Last, llama.cpp's
server (the shared ``llama`` fixture, SmolLM2) for what its dialect does with agents' requests.
"""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import jsonschema
import pytest
from harness import InProcessProxy, proxy_over
from harness import chat as greedy_chat

from codestop.engines.server import ServerEngine
from codestop.engines.server.dialects import VLLM
from codestop.families import FAMILIES
from codestop.serve.upstream_chat import continuation

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
TOOLS = [WEATHER]
CALL_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
ASK_PERSON = [{"role": "user", "content": "Invent a person; give their name and age as JSON."}]
THINK_12 = {"family": "think", "method": "vanilla", "max_reasoning_tokens": 12}  # codestop ends the thinking at 12 tokens


proxy = proxy_over("vllm_tools_url")


def chat(p: InProcessProxy, messages, codestop=None, **kwargs):
    kwargs.setdefault("max_tokens", 80)
    return greedy_chat(p, messages, codestop, **kwargs)


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


def city_of(arguments: str) -> str:
    """The ``city`` of a get_weather call's arguments, which must be JSON the tool's schema allows."""
    args = json.loads(arguments)
    assert isinstance(args, dict) and set(args) == {"city"} and isinstance(args["city"], str), args
    return args["city"]


def streamed_calls(chunks) -> tuple[str, str]:
    """(name, arguments) of the one tool call in a stream's deltas, its pieces joined."""
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert calls and all(call.index == 0 for call in calls), calls
    name = "".join(call.function.name or "" for call in calls)
    return name, "".join(call.function.arguments or "" for call in calls)


def test_a_tool_call_comes_back_as_tool_calls_streamed_or_not(proxy):
    r = chat(proxy, ASK_WEATHER, tools=TOOLS, tool_choice=CALL_WEATHER)
    msg, cs = r.choices[0].message, r.usage.codestop
    assert [c.function.name for c in msg.tool_calls] == ["get_weather"] and msg.tool_calls[0].id
    assert "paris" in city_of(msg.tool_calls[0].function.arguments).lower()  # the model's greedy argument
    assert not msg.content  # a named call: nothing else
    assert reasoning_of(msg) is None  # a model without thinking: all of its output is the answer phase
    assert cs["reasoning_tokens"] == 0 and cs["answer_tokens"] == r.usage.completion_tokens >= 1
    assert r.id.startswith("chatcmpl-") and r.model == proxy.model

    chunks = list(chat(proxy, ASK_WEATHER, tools=TOOLS, tool_choice=CALL_WEATHER, stream=True,
                       stream_options={"include_usage": True}))
    name, arguments = streamed_calls(chunks)
    assert name == "get_weather" and "paris" in city_of(arguments).lower()
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")  # the proxy's id
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.codestop["answer_tokens"] == chunks[-1].usage.completion_tokens >= 1


def test_codestops_reasoning_is_continued_by_the_upstreams_chat(proxy):
    """A thinking block codestop cut at 12 tokens: the upstream continues it (closed by codestop)
    and its answer is a tool call, the reasoning before it as reasoning_content."""
    r = chat(proxy, ASK_WEATHER, codestop=THINK_12, tools=TOOLS, tool_choice=CALL_WEATHER)
    msg, usage, cs = r.choices[0].message, r.usage, r.usage.codestop
    assert cs["stop_reason"] == "max_reasoning_tokens" and cs["reasoning_tokens"] == 12 == usage.completion_tokens_details.reasoning_tokens
    reasoning = reasoning_of(msg)
    assert reasoning.strip() and "<think>" not in reasoning and "</think>" not in reasoning
    assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
    city_of(msg.tool_calls[0].function.arguments)
    assert usage.completion_tokens == 12 + cs["answer_tokens"] and cs["answer_tokens"] >= 1

    chunks = list(chat(proxy, ASK_WEATHER, codestop=THINK_12, tools=TOOLS, tool_choice=CALL_WEATHER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(reasoning_of(d) or "" for d in deltas) == reasoning  # greedy: the same reasoning
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert not any(reasoning_of(d) for d in deltas[first_call:])  # the reasoning, then the answer
    assert streamed_calls(chunks)[0] == "get_weather"


def test_the_upstream_continues_exactly_the_prompt_codestop_reasoned_on(proxy, vllm_tools_url):
    """What vLLM renders for the answer phase's chat body (its own template, tools included,
    ``continue_final_message``) is the proxy's reasoning prompt, the reasoning, and the close."""
    engine = ServerEngine.connect(vllm_tools_url)
    try:
        family = FAMILIES["think"]
        prompt = replace(family, template_kwargs={"tools": TOOLS}).render(engine, ASK_WEATHER)  # as serving.prepare does
        # Qwen2.5's own template survived the conversion: it lists the tools and asks for <tool_call> blocks
        assert "<tools>" in prompt and "get_weather" in prompt and "<tool_call>" in prompt
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        reasoning = "Paris is in France; I should look up its weather."
        body = VLLM().chat_body(engine.model_name, ASK_WEATHER, continuation(family, reasoning), {"tools": TOOLS})
        assert body is not None and body["continue_final_message"] is True and body["add_generation_prompt"] is False
        rendered = httpx.post(vllm_tools_url.removesuffix("/v1") + "/tokenize", json={**body, "add_special_tokens": False})
        assert engine.detokenize(rendered.json()["tokens"]) == prompt + reasoning + family.close_thinking
        closed = reasoning + "</think>\n\n"  # the model closed its thinking itself: nothing added
        assert continuation(family, closed) == "<think>\n" + closed and continuation(FAMILIES["plain"], reasoning) == ""
    finally:
        engine.close()


def test_a_json_schema_answer_validates(proxy):
    r = chat(proxy, ASK_PERSON, response_format=PERSON_FORMAT)
    person = json.loads(r.choices[0].message.content)
    jsonschema.validate(person, PERSON)

    chunks = list(chat(proxy, ASK_PERSON, codestop=THINK_12, response_format=PERSON_FORMAT, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(reasoning_of(d) or "" for d in deltas).strip()  # codestop's reasoning first
    after = json.loads("".join(d.content or "" for d in deltas))  # then the schema's JSON, continued from it
    jsonschema.validate(after, PERSON)


def test_the_follow_up_turn_with_the_tools_result(proxy):
    """The conversation an agent sends back: the assistant's tool call and the tool's result
    (role "tool"); the model answers from the result."""
    r = chat(proxy, ASK_WEATHER, tools=TOOLS, tool_choice=CALL_WEATHER)
    call = r.choices[0].message.tool_calls[0]
    turn = [*ASK_WEATHER,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": "Paris", "temperature_c": 17, "sky": "clear"})}]
    r = chat(proxy, turn, tools=TOOLS, max_tokens=60)
    msg = r.choices[0].message
    assert not msg.tool_calls and r.choices[0].finish_reason == "stop"
    assert "17" in msg.content, msg.content  # the tool's result reached the model (greedy: it quotes it)


RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's function tool: flat


def test_the_responses_api_calls_a_function_through_the_agents_path_streamed_or_not(proxy):
    """/v1/responses with a function tool: the answer phase is the upstream's chat, its tool call a
    ``function_call`` output item (streamed: its arguments as deltas)."""
    client = proxy.client()
    ask = {"model": proxy.model, "input": ASK_WEATHER[0]["content"], "tools": [RESPONSES_WEATHER], "temperature": 0,
           "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 80}
    r = client.responses.create(**ask)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id and r.status == "completed"
    assert "paris" in city_of(call.arguments).lower()
    assert r.usage.model_extra["codestop"]["answer_tokens"] == r.usage.output_tokens >= 1
    events = list(client.responses.create(**ask, stream=True))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert city_of(arguments) == city_of(call.arguments)  # greedy: the same call streamed or not
    (item,) = events[-1].response.output
    assert events[-1].type == "response.completed" and item.type == "function_call" and item.arguments == arguments


def test_an_openai_agents_agent_calls_its_tool_and_answers_from_the_result(proxy):
    """openai-agents on its default model (the Responses API) through the proxy: the tool is called
    (its name in tool_choice, see above), its result sent back in input, and the model answers."""
    from agents import Agent, ModelSettings, OpenAIProvider, RunConfig, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no internet: nothing is exported
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return json.dumps({"city": city, "temperature_c": 17, "sky": "clear"})

    client = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    agent = Agent(name="weather", model=proxy.model, tools=[get_weather],
                  model_settings=ModelSettings(temperature=0, max_tokens=80, tool_choice="get_weather"))
    result = Runner.run_sync(agent, ASK_WEATHER[0]["content"], max_turns=3,
                             run_config=RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True))
    assert [c.lower() for c in cities] == ["paris"]  # called once; then tool_choice is reset and the model answers
    assert isinstance(result.final_output, str) and result.final_output


def test_fields_still_not_honoured_keep_their_400(proxy):
    def post(path, **body):
        return httpx.post(proxy.url + path, json={"model": proxy.model, **body}, timeout=120)

    chat_body = {"messages": ASK_WEATHER, "max_tokens": 4}
    cases = [
        ("/v1/chat/completions", {**chat_body, "tools": TOOLS, "logprobs": True}, "logprobs", "unsupported_parameter"),
        ("/v1/chat/completions", {**chat_body, "functions": [WEATHER["function"]]}, "functions", "unsupported_parameter"),
        ("/v1/completions", {"prompt": "Hi", "tools": TOOLS}, "tools", "unsupported_parameter"),
        ("/v1/completions", {"prompt": "Hi", "response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ("/v1/chat/completions", {**chat_body, "tool_choice": "required"}, "tool_choice", None),  # no tools to choose
        ("/v1/chat/completions", {**chat_body, "response_format": {"type": "xml"}}, "response_format", None),
        ("/v1/chat/completions", {**chat_body, "tools": [{"name": "get_weather"}]}, "tools", None),
    ]
    for path, body, param, code in cases:
        r = post(path, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and r.json()["error"]["code"] == code, (body, r.text)
    r = post("/v1/chat/completions", **chat_body, tools=TOOLS, codestop={**THINK_12, "method": "codestop", "answer_from": "best"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "codestop.answer_from", r.text  # the upstream answers from the stop
    # the upstream's own check, relayed: a named function that is not among the tools
    r = post("/v1/chat/completions", **chat_body, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "upstream_rejected", r.text


def test_an_upstreams_400_is_the_clients_error_on_every_path(proxy):
    """vLLM takes a seed in int64 only, which the proxy does not check: its 400 comes back as the
    client's, in vLLM's words, whichever path sent it (the reasoning's completions, streamed or
    not; the agents' chat), never a 502 as if the upstream were down."""
    seed = 2**63  # one past int64
    cases = {
        "chat": ("/v1/chat/completions", {"messages": ASK_WEATHER}),
        "streamed chat": ("/v1/chat/completions", {"messages": ASK_WEATHER, "stream": True}),
        "completion": ("/v1/completions", {"prompt": "Hello"}),
        "agent's chat": ("/v1/chat/completions", {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": CALL_WEATHER}),
        "agent's streamed chat": ("/v1/chat/completions", {"messages": ASK_WEATHER, "response_format": PERSON_FORMAT, "stream": True}),
    }
    for what, (path, body) in cases.items():
        r = httpx.post(proxy.url + path, json={"model": proxy.model, "max_tokens": 4, "seed": seed, **body}, timeout=120)
        error = r.json()["error"]
        assert (r.status_code, error["type"], error["code"]) == (400, "invalid_request_error", "upstream_rejected"), (what, r.text)
        assert "refused the request: it answered 400" in error["message"] and "seed" in error["message"], (what, r.text)


def test_an_engine_without_a_chat_endpoint_refuses_agents_requests(toy_tokenizer):
    """In-process engines have no upstream chat endpoint to parse tool calls or enforce a format:
    a 400 naming the field, before anything runs."""
    from scripted import ScriptedEngine

    p = InProcessProxy(ScriptedEngine(toy_tokenizer, "Step. " * 20, window=2048))
    try:
        for field, value in (("tools", TOOLS), ("response_format", PERSON_FORMAT)):
            r = httpx.post(p.url + "/v1/chat/completions", json={"messages": ASK_WEATHER, field: value}, timeout=30)
            error = r.json()["error"]
            assert (r.status_code, error["param"], error["code"]) == (400, field, "unsupported_parameter"), r.text
            assert "completions server upstream" in error["message"]
    finally:
        p.stop()


def test_llama_cpp_answers_a_plain_models_agent_request_and_refuses_to_continue_a_thinking_one(llama):
    """llama.cpp's server (xllamacpp, SmolLM2) enforces a JSON schema in its chat endpoint; it
    cannot continue a reasoning there (it repeats the prefilled message in its answer, and refuses a
    prefill with a response format), so a thinking model's agent request is a 400 before it runs."""
    p = InProcessProxy(ServerEngine.connect(llama.url + "/v1", backoff=0.05))
    p.model = p.client().models.list().data[0].id
    try:
        r = chat(p, ASK_PERSON, response_format=PERSON_FORMAT, max_tokens=40)
        person = json.loads(r.choices[0].message.content)
        assert set(person) == {"name", "age"} and isinstance(person["name"], str) and type(person["age"]) is int
        assert r.usage.codestop["answer_tokens"] == r.usage.completion_tokens >= 1

        refused = httpx.post(p.url + "/v1/chat/completions", timeout=30, json={
            "messages": ASK_PERSON, "response_format": PERSON_FORMAT, "codestop": {"family": "think"}})
        error = refused.json()["error"]
        assert (refused.status_code, error["param"]) == (400, "response_format") and "cannot continue" in error["message"], refused.text
    finally:
        p.stop()


def test_the_answer_phase_is_sent_as_every_upstream_request_is(llama):
    """The agents' chat request goes through the engine's request path: an upstream's 503 is
    retried (counted in codestop_upstream_retries_total), as every request is (its place in the
    proxy's limit: test_server_engine.py's test_a_chat_request_holds_a_place_in_the_limit...)."""
    from llama_servers import FaultProxy

    fault = FaultProxy(llama.url)
    p = InProcessProxy(ServerEngine.connect(fault.url + "/v1", backoff=0.05))
    p.model = p.client().models.list().data[0].id
    try:
        fault.mode = "status_once"  # one 503, then the real answer
        r = chat(p, ASK_PERSON, response_format=PERSON_FORMAT, max_tokens=40)
        assert set(json.loads(r.choices[0].message.content)) == {"name", "age"}
        assert [b.get("response_format") for b in fault.seen] == [PERSON_FORMAT] * 2  # the chat request, sent again
        assert "codestop_upstream_retries_total 1.0" in p.metrics().splitlines()
    finally:
        p.stop()
        fault.stop()


def test_replicas_answer_an_agents_request_through_one_replicas_chat_endpoint(llama, smollm2_path):
    """One chat request, to one replica (the first of equals); a replica that fails before
    answering leaves the rotation and the next one answers."""
    from llama_servers import LlamaServer

    from codestop.engines.replicas import ReplicaEngine

    other = LlamaServer(smollm2_path, slots=1).start()
    p = InProcessProxy(ReplicaEngine.connect([other.url + "/v1", llama.url + "/v1"], backoff=0.05))
    p.model = p.client().models.list().data[0].id

    def chats() -> dict[str, str]:
        return {line.split('replica="')[1].split('"')[0]: line.rsplit(" ", 1)[1] for line in p.metrics().splitlines()
                if line.startswith("codestop_upstream_requests_total{") and 'kind="chat"' in line}

    try:
        r = chat(p, ASK_PERSON, response_format=PERSON_FORMAT, max_tokens=40)
        person = json.loads(r.choices[0].message.content)
        assert set(person) == {"name", "age"} and type(person["age"]) is int
        assert chats() == {other.url: "1.0"}  # one request, to one replica
        other.kill()
        r = chat(p, ASK_PERSON, response_format=PERSON_FORMAT, max_tokens=40)
        assert set(json.loads(r.choices[0].message.content)) == {"name", "age"}
        assert chats()[llama.url] == "1.0"  # the one still up answered
        health = httpx.get(p.url + "/health").json()
        assert [r["healthy"] for r in health["replicas"]] == [False, True], health
    finally:
        p.stop()
        other.kill()


def test_each_dialect_says_how_its_chat_endpoint_continues_a_message():
    from codestop.engines.server.dialects import DIALECTS, GENERIC

    messages, fields = list(ASK_WEATHER), {"tools": TOOLS, "temperature": 0}
    for dialect in (*DIALECTS.values(), GENERIC):  # no reasoning to continue: the client's request as sent
        assert dialect.chat_body("m", messages, "", fields) == {"model": "m", "messages": messages, **fields}
    for name in ("vllm", "sglang"):
        body = DIALECTS[name].chat_body("m", messages, "<think>\nx\n</think>\n\n", fields)
        assert body == {"model": "m", "messages": [*messages, {"role": "assistant", "content": "<think>\nx\n</think>\n\n"}],
                        **fields, "continue_final_message": True, "add_generation_prompt": False}
    assert DIALECTS["llamacpp"].chat_body("m", messages, "x", fields) is None and GENERIC.chat_body("m", messages, "x", fields) is None
