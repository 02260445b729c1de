"""``POST /v1/responses``: the Responses API over the chat path (codestop/serve/responses.py).

Model-free: a scripted in-process engine (tests/scripted.py) whose "model" thinks, closes its
thinking and answers, read with the official openai client's ``responses.create``, plain and
streamed, and the translation of a Responses request into the chat request it asks for. Against
the REAL vLLM (slow): the openai client and an openai-agents ``Agent`` on its default model
(``OpenAIResponsesModel``) through the proxy.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pydantic
import pytest
from harness import InProcessProxy, metric, proxy_over
from openai.types.responses import Response, ResponseStreamEvent
from scripted import ScriptedEngine

from codestop.config import GenerationConfig
from codestop.controller import Result
from codestop.serve.defaults import DEFAULT_CONFIG
from codestop.serve.responses import ResponsesWriter, parse, prepare
from codestop.serve.serving import server_defaults

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)  # the openai SDK's model of the Responses' events
SCRIPT = "Step one. Step two.</think>The answer is 5."
THINK = {"family": "think", "method": "vanilla"}


@pytest.fixture
def scripted(toy_tokenizer):
    p = InProcessProxy(ScriptedEngine(toy_tokenizer, SCRIPT), config=GenerationConfig(family="think", answer="free"),
                       policy={"method": "vanilla"})
    yield p
    p.stop()


def post(p: InProcessProxy, **body) -> httpx.Response:
    return httpx.post(p.url + "/v1/responses", json=body, timeout=30)


def test_a_plain_response_has_a_reasoning_item_a_message_and_codestops_usage(scripted):
    r = scripted.client().responses.create(model="scripted", input="What is 2 + 3?", max_output_tokens=64)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed" and r.model == "scripted"
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.summary == [] and reasoning.content[0].text == "Step one. Step two."
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert r.output_text == message.content[0].text == "The answer is 5."
    u = r.usage
    assert u.output_tokens == u.output_tokens_details.reasoning_tokens + u.model_extra["codestop"]["answer_tokens"]
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.input_tokens > 0
    assert u.model_extra["codestop"]["policy"] == {"method": "vanilla"} and r.store is False
    Response.model_validate(post(scripted, input="Hi").json())  # the SDK's own model of a response, validated
    assert metric(scripted.metrics(), "codestop_requests_total", endpoint="responses", status="200") == 2


def test_the_policy_and_max_output_tokens_apply_as_in_chat(scripted):
    r = scripted.client().responses.create(model="scripted", input="Hi", extra_body={"codestop": {"method": "budget", "budget": 3}})
    cs = r.usage.model_extra["codestop"]
    assert cs["stop_reason"] == "budget" and cs["reasoning_tokens"] == 3
    cut = scripted.client().responses.create(model="scripted", input="Hi", max_output_tokens=4)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens" and cut.usage.output_tokens == 4
    assert [i.type for i in cut.output] == ["reasoning"]  # the cap ended the thinking: no answer, no empty message
    events = list(scripted.client().responses.create(model="scripted", input="Hi", max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert [i.type for i in events[-1].response.output] == ["reasoning"]


def test_a_streamed_response_is_the_responses_events_in_order(scripted):
    events = list(scripted.client().responses.create(model="scripted", input="What is 2 + 3?", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and [e.sequence_number for e in events] == list(range(len(events)))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert reasoning == "Step one. Step two." and answer == "The answer is 5."
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["reasoning", "message"] and done[1].content[0].text == answer
    final = events[-1].response
    assert final.status == "completed" and [i.id for i in final.output] == [i.id for i in done]
    assert final.output_text == answer and final.usage.model_extra["codestop"]["reasoning_tokens"] > 0
    # each item opened before its deltas and closed once, on the index it was opened on
    added = [(e.output_index, e.item.id) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, done[0].id), (1, done[1].id)]


def test_shadow_mode_answers_as_the_upstream_alone_and_records_the_request(toy_tokenizer, tmp_path):
    shadow = tmp_path / "shadow.jsonl"
    config = GenerationConfig(family="think", answer="free", probe_interval=1, boundaries=("\n",))
    p = InProcessProxy(ScriptedEngine(toy_tokenizer, "Step one.\nStep two.\n</think>The answer is 5."), config=config,
                       policy={"method": "budget", "budget": 3}, shadow=shadow)
    try:
        ids = []
        for stream in (False, True):
            r = p.client().responses.create(model="scripted", input="What is 2 + 3?", stream=stream)
            r = list(r)[-1].response if stream else r
            assert r.output[0].content[0].text == "Step one.\nStep two.\n" and r.output_text == "The answer is 5."  # not stopped
            ids.append(r.id)
        lines = [json.loads(line) for line in shadow.read_text().splitlines()]
        assert [line["id"] for line in lines] == ids and all(line["probes"] for line in lines)  # each traced under its id
    finally:
        p.stop()


def test_the_sdks_stream_helper_accumulates_the_response_and_its_output_makes_the_next_turns_input(scripted):
    """What a stateless client does instead of previous_response_id: the output items sent back."""
    client = scripted.client()
    with client.responses.stream(model="scripted", input="What is 2 + 3?") as stream:
        final = stream.get_final_response()
    assert final.output_text == "The answer is 5." and final.output[0].content[0].text == "Step one. Step two."
    turn = [{"role": "user", "content": "What is 2 + 3?"}, *(o.model_dump(exclude_none=True) for o in final.output),
            {"role": "user", "content": "Sure?"}]
    r = client.responses.create(model="scripted", input=turn)
    assert r.status == "completed" and r.usage.input_tokens > final.usage.input_tokens  # the earlier answer is in the prompt


def test_an_openai_agents_agent_reads_the_reasoning_and_the_answer_run_or_streamed(scripted):
    from agents import Agent, OpenAIProvider, RunConfig, Runner, set_tracing_disabled
    from agents.items import MessageOutputItem, ReasoningItem

    set_tracing_disabled(True)  # no internet: nothing is exported
    agent = Agent(name="assistant", instructions="Be brief.", model="scripted")

    async def run() -> tuple:
        client = openai.AsyncOpenAI(base_url=scripted.url + "/v1", api_key="unused", max_retries=0)
        config = RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)
        plain = await Runner.run(agent, "What is 2 + 3?", run_config=config)
        streamed = Runner.run_streamed(agent, "What is 2 + 3?", run_config=config)
        kinds = [getattr(getattr(e, "data", None), "type", None) async for e in streamed.stream_events()]
        return plain, streamed, kinds

    plain, streamed, kinds = asyncio.run(run())
    for result in (plain, streamed):
        assert result.final_output == "The answer is 5."
        assert [type(i) for i in result.new_items] == [ReasoningItem, MessageOutputItem]
    assert "response.reasoning_text.delta" in kinds and "response.completed" in kinds
    assert plain.context_wrapper.usage.output_tokens > 0


def test_the_stream_is_framed_with_event_lines(scripted):
    with httpx.stream("POST", scripted.url + "/v1/responses", json={"input": "Hi", "stream": True}, timeout=30) as r:
        text = r.read().decode()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in text.split("\n\n") if f]
    assert frames[0].startswith("event: response.created\ndata: {") and frames[-1].startswith("event: response.completed\n")
    assert "[DONE]" not in text  # the Responses stream ends at its terminal event
    for frame in frames:  # each as the SDK's own models have it, strictly; its event line names its type
        kind, data = frame.split("\n", 1)
        event = EVENT.validate_json(data.removeprefix("data: "))
        assert kind == f"event: {event.type}"


def test_input_items_become_the_chat_conversation():
    request, chat = parse({"instructions": "Be brief.", "max_output_tokens": 9, "reasoning": {"effort": "low", "summary": "auto"},
                           "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}]},
                                     {"type": "reasoning", "id": "rs_1", "summary": []},
                                     {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'},
                                     {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
                           "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": True}],
                           "tool_choice": {"type": "function", "name": "weather"},
                           "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
                           "store": True, "include": [], "metadata": {"codestop_segment": "a"}})
    assert [m.wire() for m in chat.messages] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    assert chat.tools == [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}, "strict": True}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    assert chat.max_completion_tokens == 9 and chat.reasoning_effort == "low" and chat.metadata == {"codestop_segment": "a"}
    assert request.store is True and chat.agent


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": "Hi", "previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
    ({"input": "Hi", "conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"input": "Hi", "background": True}, "background", "unsupported_parameter"),
    ({"input": "Hi", "include": ["reasoning.encrypted_content"]}, "include", "unsupported_parameter"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "unsupported_parameter"),
    ({"input": "Hi", "max_tokens": 5}, "max_tokens", "unknown_parameter"),
    ({"input": "Hi", "max_output_tokens": "5"}, "max_output_tokens", None),
    ({"input": "Hi", "reasoning": {"effort": "huge"}}, "reasoning.effort", None),
    ({"instructions": "Be brief.", "input": [{"role": "wizard", "content": "Hi"}]}, "input[0].role", None),
    ({"instructions": "Be brief.", "input": [{"role": "user", "content": 7}]}, "input[0].content", None),
    ({"input": []}, "input", None),
    ({}, "input", None),
])
def test_what_a_stateless_proxy_cannot_do_is_one_400_naming_the_field(scripted, body, param, code):
    r = post(scripted, **body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and error["code"] == code, error
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    if param == "previous_response_id":
        assert "stores no responses" in error["message"] and "input" in error["message"]


def test_max_output_tokens_over_the_window_is_named_as_the_client_named_it(toy_tokenizer):
    p = InProcessProxy(ScriptedEngine(toy_tokenizer, SCRIPT, window=64))
    try:
        r = post(p, input="Hi", max_output_tokens=500)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"
        r = post(p, input="Hi " * 100)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input" and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        p.stop()


def test_tools_on_an_engine_without_a_chat_endpoint_are_refused_clearly(scripted):
    r = post(scripted, input="Hi", tools=[{"type": "function", "name": "weather", "parameters": {"type": "object"}}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "needs a completions server upstream" in r.json()["error"]["message"]


def test_an_upstreams_streamed_tool_calls_become_function_call_items(toy_tokenizer):
    """The agents' path's chat deltas (what upstream_chat.stream hands the writer), as Responses events."""
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    request, chat = parse({"input": "Weather?", "stream": True})
    prep = asyncio.run(prepare(chat, engine, server_defaults(DEFAULT_CONFIG, {"method": "vanilla"}, None)))
    writer = ResponsesWriter(prep, request)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    text = writer.delta({"content": "Let me look."}) + writer.delta({"tool_calls": [call]})
    for piece in ('{"city": ', '"Paris"}'):
        text += writer.delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    text += writer.delta({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "get_time", "arguments": "{}"}}]})
    tokens = {"prompt": 5, "reasoning": 0, "probe": 0, "probe_prompt": 0, "answer": 9, "overrun": 0}
    result = Result(question="Weather?", answer=None, answer_text="Let me look.", reasoning_text="", stop_reason="finished",
                    answer_position=0, probes=[], steps=0, tokens=tokens, timings={}, policy={"method": "vanilla"},
                    model="scripted", engine="scripted", family="plain")
    text += writer.end("tool_calls", result)
    events = [json.loads(frame.split("data: ", 1)[1]) for frame in text.split("\n\n") if frame]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta") == '{"city": "Paris"}{}'
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"]) for e in done] == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][1] | {"id": None} == {"id": None, "type": "function_call", "call_id": "call_1", "name": "get_weather",
                                                 "arguments": '{"city": "Paris"}', "status": "completed"}
    assert final["usage"]["output_tokens"] == 9 and final["usage"]["codestop"]["answer_tokens"] == 9
    for event in events:  # each as the SDK's own models have it, strictly
        EVENT.validate_python(event)


# --------------------------------------------------------------------------------------------
# The real vLLM: the openai client and an openai-agents Agent through the proxy
# --------------------------------------------------------------------------------------------

proxy = proxy_over("vllm_url")
SHORT = 16


@pytest.mark.slow
def test_the_openai_client_gets_a_response_from_vllm_through_the_proxy_streamed_or_not(proxy):
    client = proxy.client()
    r = client.responses.create(model=proxy.model, input="What is the capital of France?", max_output_tokens=SHORT, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text and r.usage.output_tokens <= SHORT
    cs = r.usage.model_extra["codestop"]  # a plain model: its output is codestop's reasoning, OpenAI's reasoning_tokens 0
    assert cs["reasoning_tokens"] + cs["answer_tokens"] == r.usage.output_tokens and r.usage.output_tokens_details.reasoning_tokens == 0
    events = list(client.responses.create(model=proxy.model, input="What is the capital of France?", max_output_tokens=SHORT,
                                          temperature=0, stream=True))
    final = events[-1].response
    assert final.output_text == r.output_text  # greedy: the same words streamed or not
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    # the thinking family on SmolLM2: codestop's reasoning item, stopped by the policy at its first probe
    think = {"family": "think", "probe_interval": 4, "boundaries": ["\n"], "method": "codestop", "r_min": 0.0, "r_max": 0.0}
    t = client.responses.create(model=proxy.model, input="Write a short poem about the sea.", max_output_tokens=32, temperature=0,
                                extra_body={"codestop": think})
    assert t.output[0].type == "reasoning" and t.output[0].content[0].text
    assert t.usage.model_extra["codestop"]["stopped_early"] and t.usage.output_tokens_details.reasoning_tokens > 0


@pytest.mark.slow
def test_an_openai_agents_agent_on_its_default_model_answers_through_the_proxy(proxy):
    from agents import Agent, ModelSettings, OpenAIProvider, OpenAIResponsesModel, RunConfig, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # no internet: nothing is exported
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    provider = OpenAIProvider(openai_client=client)  # the default provider, with its default API: Responses
    assert isinstance(provider.get_model(proxy.model), OpenAIResponsesModel)
    agent = Agent(name="assistant", instructions="Answer in one short sentence.", model=proxy.model,
                  model_settings=ModelSettings(temperature=0, max_tokens=48))
    result = Runner.run_sync(agent, "Say hello.", run_config=RunConfig(model_provider=provider, tracing_disabled=True))
    assert isinstance(result.final_output, str) and result.final_output
    assert sum(r.usage.output_tokens for r in result.raw_responses) > 0
