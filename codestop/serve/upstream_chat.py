"""Agents' requests answered through the upstream's chat endpoint: a chat request with ``tools``
(``tool_choice``, ``parallel_tool_calls``) or a ``response_format`` (JSON mode, a JSON schema).

The reasoning phase is codestop's as for any request: the conversation (tools included) rendered
through the model's template, the policy watching the probes. The answer phase (after a stop, or
after the model closed its thinking) is the upstream's own chat endpoint: the client's conversation
with the reasoning so far as the final assistant message to continue, and the client's agent fields
passed through, so the upstream parses tool calls and enforces the schema exactly as it does
without codestop. For a model without thinking, all of its output is the answer phase: the request
goes to the upstream's chat endpoint as the client sent it. The request is the engine's
(:meth:`~codestop.engines.server.ServerEngine.chat`, a replica engine's picks its replica): sent
as every upstream request is, under the proxy's limit, with its retries and its reading of SSE.
How a server kind continues a message is its dialect's
(:meth:`codestop.engines.server.dialects.Dialect.chat_body`).

The response is the upstream's answer (``content``, ``tool_calls``, ``finish_reason``) under the
proxy's id and model, with the reasoning as ``reasoning_content`` and ``usage`` counting both phases
(``usage.codestop`` as for any request, ``answer_tokens`` the upstream's completion tokens).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from codestop.controller import Event, Result, astream
from codestop.engines.base import Engine
from codestop.engines.replicas import ReplicaEngine
from codestop.engines.server.engine import ServerEngine
from codestop.errors import ParameterError
from codestop.families import Family
from codestop.policies import policy_options
from codestop.serve.metrics import Metrics
from codestop.serve.protocol import ChatRequest, RequestError, Unsupported
from codestop.serve.serving import Prepared, Splitter, SSEWriter, result_of, split_result, usage_of

ChatEngine = ServerEngine | ReplicaEngine  # the engines with an upstream chat endpoint


def chat_upstream(engine: Engine, request: ChatRequest, prep: Prepared) -> ChatEngine:
    """The engine as one whose upstream's chat endpoint answers an agent's request, or a 400
    saying why it cannot."""
    if not isinstance(engine, ServerEngine | ReplicaEngine):
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


def _cannot_continue(engine: ChatEngine, request: ChatRequest) -> RequestError:
    first = _first(request)
    return RequestError(f"{first}: the upstream ({engine.dialect.name}) cannot continue a thinking model's reasoning "
                        "in its chat endpoint (vLLM and SGLang can); ask without tools and response_format, or with "
                        "a model that does not think", first)


def _first(request: ChatRequest) -> str:
    return next(iter(request.agent_fields()))


async def complete(engine: Engine, request: ChatRequest, prep: Prepared, metrics: Metrics) -> dict[str, Any]:
    """A plain (not streamed) agent's answer, as OpenAI's chat completion."""
    upstream = chat_upstream(engine, request, prep)
    reasoning = await result_of(_reason(upstream, prep)) if prep.family.thinks else None
    data: dict[str, Any] = {}
    if (fields := _chat_fields(request, prep, reasoning)) is not None:
        async with aclosing(_chat(upstream, request, prep, reasoning, fields, stream=False)) as answers:
            data = await anext(answers)
    choice = (data.get("choices") or [{}])[0]
    answer = choice.get("message") or {}
    result = _answered(upstream, prep, reasoning, str(answer.get("content") or ""), data.get("usage"))
    metrics.count_result(result)
    message: dict[str, Any] = {"role": "assistant", "content": answer.get("content")}
    if prep.family.thinks:  # the thinking; text after the model's own close, if any, leads the answer
        parts = split_result(replace(result, answer_text=""), prep.family, True)
        message["reasoning_content"] = parts["reasoning_content"]
        if parts["content"]:
            message["content"] = parts["content"] + (message["content"] or "")
    if answer.get("tool_calls"):
        message["tool_calls"] = answer["tool_calls"]
    finish = choice.get("finish_reason") or "length"  # no answer phase: the reasoning took every token
    return {"id": prep.rid, "object": "chat.completion", "created": prep.created, "model": prep.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage_of(result, prep.family)}


async def stream(engine: Engine, request: ChatRequest, prep: Prepared, metrics: Metrics, state: Any,
                 writer: SSEWriter | None = None) -> AsyncGenerator[str, None]:
    """A streamed agent's answer as SSE chunks (``writer``'s: default chat's): the reasoning as
    ``reasoning_content`` deltas while it runs, then the upstream's chat deltas (``content``,
    ``tool_calls``) relabelled as the proxy's. Nothing is yielded before the first delta, so a
    failure before it is still an HTTP error; one after it ends the stream with an error event."""
    upstream = chat_upstream(engine, request, prep)
    writer = SSEWriter(prep) if writer is None else writer
    try:
        reasoning: Result | None = None
        if prep.family.thinks:
            splitter = Splitter(prep.family, True)
            async with aclosing(_reason(upstream, prep)) as events:
                async for item in events:
                    if isinstance(item, Result):
                        reasoning = item
                        pieces = splitter.flush()
                    elif item.kind == "reasoning":
                        pieces = splitter.feed(item.kind, item.text)
                    else:
                        continue
                    if out := writer.texts(pieces):
                        yield out
        finish, usage, content = "length", None, ""
        if (fields := _chat_fields(request, prep, reasoning)) is not None:
            async with aclosing(_chat(upstream, request, prep, reasoning, fields, stream=True, started=writer.started)) as events:
                async for data in events:
                    usage = data.get("usage") or usage
                    for choice in data.get("choices") or []:
                        delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role" and v is not None}
                        content += str(delta.get("content") or "")
                        finish = choice.get("finish_reason") or finish
                        if delta:
                            yield writer.delta(delta)
        result = _answered(upstream, prep, reasoning, content, usage)
        metrics.count_result(result)
        state.outcome = 200
        yield writer.end(finish, result)
    except Exception as exc:
        if not writer.started:
            raise
        yield writer.error(exc, state)


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


def _chat_fields(request: ChatRequest, prep: Prepared, reasoning: Result | None) -> dict[str, Any] | None:
    """The answer phase's fields beside the conversation: the client's agent fields, its stops and
    what is left of its ``max_tokens``; None when the reasoning used every token it allowed."""
    fields: dict[str, Any] = dict(request.agent_fields())
    if prep.config.stop:
        fields["stop"] = list(prep.config.stop)
    if prep.config.max_tokens is not None:
        left = prep.config.max_tokens - (reasoning.tokens["reasoning"] if reasoning else 0)
        if left < 1:
            return None
        fields["max_tokens"] = left
    return fields


def _chat(engine: ChatEngine, request: ChatRequest, prep: Prepared, reasoning: Result | None, fields: dict[str, Any],
          stream: bool, started: bool = False) -> AsyncGenerator[dict[str, Any], None]:
    """The answer phase's upstream chat request: the client's conversation, continued from the
    reasoning when there was one. The upstream's refusal of the client's fields (a named function
    not among the tools, a schema it cannot compile) is a 400 in its words, as every upstream
    error is mapped (:func:`~codestop.engines.server.transport.upstream_error`)."""
    prefix = continuation(prep.family, reasoning.reasoning_text) if reasoning is not None else ""
    return engine.chat([m.wire() for m in request.messages], prefix, fields, prep.config.sampling, stream=stream, started=started)


def _answered(engine: ChatEngine, prep: Prepared, reasoning: Result | None, content: str,
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
                  answer_position=0, probes=[], steps=0, tokens=tokens, timings={"total": 0.0},
                  policy=policy_options(prep.policy), model=engine.model_name, engine=engine.name, family=prep.family.name)
