"""Agents' requests: a chat request with ``tools`` (``tool_choice``, ``parallel_tool_calls``) or a
``response_format`` (JSON mode, a JSON schema).

The reasoning phase is codestop's as for any request: the conversation (tools included) rendered
through the model's template, the policy watching the probes. The answer phase (after a stop, or
after the model closed its thinking) is the upstream's own chat endpoint: the client's conversation
with the reasoning so far as the final assistant message to continue, and the client's agent fields
passed through, so the upstream parses tool calls and enforces the schema exactly as it does
without codestop. For a model without thinking, all of its output is the answer phase: the request
goes to the upstream's chat endpoint as the client sent it. How a server kind continues a message
is its dialect's (:meth:`codestop.engines.server.dialects.Dialect.chat_body`).

The response is the upstream's answer (``content``, ``tool_calls``, ``finish_reason``) under the
proxy's id and model, with the reasoning as ``reasoning_content`` and ``usage`` counting both phases
(``usage.codestop`` as for any request, ``answer_tokens`` the upstream's completion tokens).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx

from codestop.controller import Event, Result, astream
from codestop.engines.base import Engine
from codestop.engines.replicas import ReplicaEngine
from codestop.engines.server.dialects import CHAT
from codestop.engines.server.engine import ServerEngine
from codestop.engines.server.transport import error_message
from codestop.errors import ParameterError, ServerError
from codestop.families import Family
from codestop.policies import policy_options
from codestop.serve.metrics import Metrics
from codestop.serve.protocol import ChatRequest, RequestError, Unsupported, error_for
from codestop.serve.serving import Prepared, Splitter, _chunk, _sse, result_of, split_result, usage_of


def chat_upstream(engine: Engine, request: ChatRequest, prep: Prepared) -> ServerEngine:
    """The completions server whose chat endpoint answers an agent's request (one of a replica
    engine's: the healthy one with the fewest sessions in flight), or a 400 saying why there is none."""
    if isinstance(engine, ReplicaEngine):
        healthy = [r for r in engine.replicas if r.healthy] or engine.replicas
        engine = min(healthy, key=lambda r: r.in_flight).engine
    if not isinstance(engine, ServerEngine):
        first = _first(request)
        value = request.agent_fields()[first]
        raise Unsupported(first, [t["function"]["name"] for t in value] if first == "tools" else value,
                          f"needs a completions server upstream (codestop serve --base-url), whose chat endpoint "
                          f"parses tool calls and enforces formats; this proxy runs the {engine.name} engine")
    if prep.family.thinks and not engine.dialect.continues_chat:
        raise _cannot_continue(engine, request)
    if prep.family.thinks and prep.policy.answer_from == "best":
        raise ParameterError("codestop.answer_from", "best", "is not supported with tools or response_format: the "
                             "upstream's chat endpoint answers from where the reasoning stopped")
    if "answer" in (request.codestop or {}):
        raise ParameterError("codestop.answer", (request.codestop or {})["answer"],
                             "does not apply with tools or response_format: the upstream's chat endpoint answers")
    return engine


def _cannot_continue(server: ServerEngine, request: ChatRequest) -> RequestError:
    first = _first(request)
    return RequestError(f"{first}: the upstream ({server.dialect.name}) cannot continue a thinking model's reasoning "
                        "in its chat endpoint (vLLM and SGLang can); ask without tools and response_format, or with "
                        "a model that does not think", first)


def _first(request: ChatRequest) -> str:
    return next(iter(request.agent_fields()))


async def complete(engine: Engine, request: ChatRequest, prep: Prepared, metrics: Metrics) -> dict[str, Any]:
    """A plain (not streamed) agent's answer, as OpenAI's chat completion."""
    server = chat_upstream(engine, request, prep)
    reasoning = await result_of(_reason(engine, prep)) if prep.family.thinks else None
    body = _chat_body(server, request, prep, reasoning, stream=False)
    data: dict[str, Any] = {}
    if body is not None:
        async with _chat(server, body) as response:
            data = json.loads(await response.aread())
    choice = (data.get("choices") or [{}])[0]
    upstream = choice.get("message") or {}
    result = _answered(server, prep, reasoning, str(upstream.get("content") or ""), data.get("usage"))
    metrics.count_result(result)
    message: dict[str, Any] = {"role": "assistant", "content": upstream.get("content")}
    if prep.family.thinks:  # the thinking; text after the model's own close, if any, leads the answer
        parts = split_result(replace(result, answer_text=""), prep.family, True)
        message["reasoning_content"] = parts["reasoning_content"]
        if parts["content"]:
            message["content"] = parts["content"] + (message["content"] or "")
    if upstream.get("tool_calls"):
        message["tool_calls"] = upstream["tool_calls"]
    finish = choice.get("finish_reason") or "length"  # no answer phase: the reasoning took every token
    return {"id": prep.rid, "object": "chat.completion", "created": prep.created, "model": prep.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage_of(result, prep.family)}


async def stream(engine: Engine, request: ChatRequest, prep: Prepared, metrics: Metrics, state: Any) -> AsyncGenerator[str, None]:
    """A streamed agent's answer as SSE chunks: the reasoning as ``reasoning_content`` deltas while
    it runs, then the upstream's chat deltas (``content``, ``tool_calls``) relabelled as the proxy's.
    Nothing is yielded before the first delta, so a failure before it is still an HTTP error; one
    after it ends the stream with an error event."""
    server = chat_upstream(engine, request, prep)
    started = False

    def opening() -> str:
        nonlocal started
        if started:
            return ""
        started = True
        return _sse(_chunk(prep, {"role": "assistant", "content": ""}))

    try:
        reasoning: Result | None = None
        if prep.family.thinks:
            splitter = Splitter(prep.family, True)
            async with aclosing(_reason(engine, prep)) as events:
                async for item in events:
                    if isinstance(item, Result):
                        reasoning = item
                        pieces = splitter.flush()
                    elif item.kind == "reasoning":
                        pieces = splitter.feed(item.kind, item.text)
                    else:
                        continue
                    for where, piece in pieces:
                        yield opening() + _sse(_chunk(prep, {where: piece}))
        body = _chat_body(server, request, prep, reasoning, stream=True)
        finish, usage, content = "length", None, ""
        if body is not None:
            async with _chat(server, body) as response:
                async for data in _events(response):
                    usage = data.get("usage") or usage
                    for choice in data.get("choices") or []:
                        delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role" and v is not None}
                        content += str(delta.get("content") or "")
                        finish = choice.get("finish_reason") or finish
                        if delta:
                            yield opening() + _sse(_chunk(prep, delta))
        result = _answered(server, prep, reasoning, content, usage)
        tail = opening() + _sse(_chunk(prep, {}, finish))
        if prep.include_usage:
            tail += _sse({**_chunk(prep, None), "usage": usage_of(result, prep.family)})
        metrics.count_result(result)
        state.outcome = 200
        yield tail + "data: [DONE]\n\n"
    except Exception as exc:
        if not started:
            raise
        state.outcome, payload = error_for(exc, "messages")
        yield _sse(payload)


async def first(chunks: AsyncGenerator[str, None]) -> str:
    """The stream's first chunk (a failure before it raises here); the stream is closed if this
    fails or is cancelled."""
    try:
        return await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise


def _reason(engine: Engine, prep: Prepared) -> AsyncGenerator[Event | Result, None]:
    """The reasoning phase: the controller's run without its answer."""
    return astream(engine, prep.question, prep.policy, prep.config, family=prep.family, prompt=prep.prompt,
                   reasoning_only=True)


def continuation(family: Family, reasoning_text: str) -> str:
    """The assistant's message so far, for the upstream to continue: the opened thinking, the
    reasoning, and the family's close when codestop stopped it (the model's own close is in the
    reasoning); "" for a model without thinking."""
    if not family.thinks:
        return ""
    return family.open_thinking + reasoning_text + ("" if family.think_end in reasoning_text else family.close_thinking)


def _chat_body(server: ServerEngine, request: ChatRequest, prep: Prepared, reasoning: Result | None,
               stream: bool) -> dict[str, Any] | None:
    """The upstream chat request of the answer phase; None when the reasoning used every token
    ``max_tokens`` allowed. A server kind that cannot continue a message is a 400."""
    fields: dict[str, Any] = {**server.dialect.sampling_fields(prep.config.sampling), **request.agent_fields()}
    if prep.config.stop:
        fields["stop"] = list(prep.config.stop)
    if prep.config.max_tokens is not None:
        left = prep.config.max_tokens - (reasoning.tokens["reasoning"] if reasoning else 0)
        if left < 1:
            return None
        fields["max_tokens"] = left
    if stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    fields = {k: v for k, v in fields.items() if v is not None}
    prefix = continuation(prep.family, reasoning.reasoning_text) if reasoning is not None else ""
    body = server.dialect.chat_body(server.model_name, [m.wire() for m in request.messages], prefix, fields)
    if body is None:
        raise _cannot_continue(server, request)
    return body


@asynccontextmanager
async def _chat(server: ServerEngine, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
    """The upstream chat request's 200 response, or the error it is: a 4xx for the client's fields
    (a named function not among the tools, a schema the server cannot compile) a 400 in the
    upstream's words; anything else a 502."""
    transport = server.transport
    transport.stats.by_kind["chat"] = transport.stats.by_kind.get("chat", 0) + 1
    try:
        async with transport.state().client.stream("POST", server.base_url + CHAT, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                message = error_message(response)
                if response.status_code in (400, 422):
                    raise RequestError(f"the upstream's chat endpoint refused the request: {message}", None, 400, "upstream_rejected")
                raise ServerError(f"the upstream's chat endpoint answered {response.status_code}: {message}", 502,
                                  response.status_code)
            yield response
    except httpx.TransportError as err:
        raise transport.unreachable(err) from None


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an SSE response, up to ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        data = json.loads(payload)
        if isinstance(data, dict) and data.get("error"):
            raise ServerError(f"the upstream's chat endpoint failed mid-stream: {data['error']}", 502)
        if isinstance(data, dict):
            yield data


def _answered(server: ServerEngine, prep: Prepared, reasoning: Result | None, content: str,
              usage: dict[str, Any] | None) -> Result:
    """The run's Result with the upstream's answer: its text and completion tokens (the prompt's
    from the upstream when there was no reasoning phase)."""
    usage = usage or {}
    answer_tokens = int(usage.get("completion_tokens") or 0)
    if reasoning is not None:
        return replace(reasoning, answer_text=content, tokens={**reasoning.tokens, "answer": answer_tokens})
    tokens = {"prompt": int(usage.get("prompt_tokens") or 0), "reasoning": 0, "probe": 0, "probe_prompt": 0,
              "answer": answer_tokens, "overrun": 0}
    return Result(question=prep.question, answer=None, answer_text=content, reasoning_text="", stop_reason="finished",
                  stop_position=0, answer_position=0, probes=[], steps=0, tokens=tokens, timings={"total": 0.0},
                  policy=policy_options(prep.policy), model=server.model_name, engine=server.name, family=prep.family.name)
