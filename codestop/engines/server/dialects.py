"""Server dialects: what differs between the completions servers codestop talks to, one small
:class:`Dialect` object per kind. Nothing outside this module asks which server it talks to.

**Adding a server kind** is adding one subclass of :class:`Dialect` here, named by the ``owned_by``
its ``/v1/models`` lists, overriding only what differs, and listing it in ``DIALECTS``. A server
whose ``owned_by`` is not listed is spoken to as the generic OpenAI-compatible server (the
:class:`Dialect` base): streamed steps and probes cut client-side, every known tokenizer route tried.

Checked against live servers: vLLM 0.32 (CPU build; the tests start one): ``owned_by: vllm`` and
``max_model_len`` in ``/v1/models``; logprob tokens as ``token_id:N`` with
``return_tokens_as_token_ids``; the matched stop string as ``stop_reason`` (None for EOS, listed as
the last token); ``/tokenize`` (with ``messages`` it renders the chat template) and
``/detokenize``; at most 4 stop strings. llama.cpp's ``llama-server`` through xllamacpp:
``/v1/models`` (``owned_by: llamacpp``), ``/props``, ``/tokenize`` with pieces, ``/detokenize``,
``/apply-template``, streamed ``/v1/completions`` with chat-format logprobs (``id``, ``bytes``; the
EOS it stopped at is listed, with no bytes), and the native ``/completion`` (``tokens``, EOS
included; ``stop_type``, ``stopping_word``); text prompts through a proxy that refuses token ids as
llama-cpp-python does. Checked against source only: SGLang
(python/sglang/srt/entrypoints/openai/protocol.py and serving_completions.py: ids as the choice's
``token_ids`` with ``return_token_ids``, a delta per event when streamed; logprob tokens are text
only, so an SGLang without ``token_ids`` has its text re-tokenized; the matched stop as
``matched_stop``: the string, or the id of a stop token such as EOS; ``/v1/tokenize`` and
``/v1/detokenize``).

Steps ask for their ids without logprobs where the server lists them apart (``step_ids``: vLLM's
and SGLang's ``return_token_ids``; vLLM computes logprobs for every token asked), probes with them.
llama.cpp's steps keep ``logprobs``/``n_probs`` 1: only they carry each token's exact bytes (its
native stream's ``tokens`` come without, and its ``/detokenize`` answers U+FFFD for a token that holds
part of a character), and on this CPU they cost it no measurable speed (BENCHMARKS.md).

Plain or streamed: a step whose stop strings all fit is one plain request on servers that say
exactly which tokens they generated: vLLM (``include_stop_str_in_output``), SGLang
(``no_stop_trim``), llama.cpp (its native ``/completion`` with ``return_tokens``). A plain request
asks for at most ``PLAIN_REQUEST_TOKENS`` tokens (a longer step continues with another request), so
a healthy server answers well within the timeout. A probe is plain with ``stop=["}"]`` where the
server keeps the stop string, else streamed and closed at the brace (llama.cpp drops the logprobs of
a token that holds a stop string).

Agents' requests (``tools``, ``response_format``): the answer phase goes to the server's own chat
endpoint, continuing the reasoning so far as the final assistant message (:meth:`Dialect.chat_body`):
vLLM's ``continue_final_message`` with ``add_generation_prompt: false`` (checked live); SGLang's
``continue_final_message`` (source: its ChatCompletionRequest and serving_chat.py). llama.cpp's
server (xllamacpp, checked live) continues a final assistant message by itself (``prefill_assistant``)
but repeats it in its answer's ``content``, and with a ``response_format`` refuses it ("Failed to
initialize samplers"): it is not asked to continue one (a model without thinking needs no continuing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from codestop.engines.server.transport import COMPLETIONS, Chunk, parse_choice, parse_native
from codestop.sampling import Sampling

CHAT = "/v1/chat/completions"  # agents' answer phase (ServerEngine.chat, codestop/serve/upstream_chat.py)
# most tokens one plain request asks for: a plain answer is silent until done, so this keeps it
# well inside ``timeout`` on any working server (a longer step continues with another request)
PLAIN_REQUEST_TOKENS = 256


@dataclass(frozen=True)
class Route:
    """One way a server tokenizes or detokenizes: the path, the body for (text or ids, model),
    and the key of the answer."""

    path: str
    body: Callable[[Any, str], dict[str, Any]]
    answer: str


@dataclass(frozen=True)
class Request:
    """How one step or probe is asked for: the path, the fields beside the prompt and the model,
    the parser of the answer, and whether it is streamed."""

    path: str
    fields: dict[str, Any]
    parse: Callable[[dict[str, Any]], Chunk]
    stream: bool


@dataclass(frozen=True)
class ServerFacts:
    """What a server says about its model beyond ``/v1/models``' listing."""

    window: int | None
    template: str = ""
    eos_text: str | None = None


def _openai_tokenize(path: str) -> Route:
    return Route(path, lambda text, model: {"model": model, "prompt": text, "add_special_tokens": False}, "tokens")


class Dialect:
    """The generic OpenAI-compatible completions server, and what every kind shares."""

    name = "openai-compatible"  # the ``owned_by`` of a kind
    max_stops = 4  # stop strings one request may carry: the OpenAI API's cap, and vLLM's
    token_ids: Mapping[str, Any] = {}  # request fields that make the server report the ids it generated
    # fields that make it list a step's ids without logprobs, which only probes need (asking for
    # them costs the server work per token); None: ids come only in logprobs
    step_ids: Mapping[str, Any] | None = None
    keep_stops: Mapping[str, Any] | None = None  # fields that keep a matched stop string in the output; None: it cannot
    tokenize: Route | None = None  # the server's own tokenizer (None: every known route is tried)
    detokenize: Route | None = None
    continues_chat = False  # whether its chat endpoint continues a final assistant message (agents' requests)

    @property
    def plain_steps(self) -> bool:
        """Whether one plain request can end a step at a boundary and say exactly which tokens it
        generated (else steps are streamed and cut client-side)."""
        return self.keep_stops is not None

    def facts(self, client: httpx.Client, root: str, listed: dict[str, Any]) -> ServerFacts:
        """The context window from the model's entry in ``/v1/models`` (vLLM ``max_model_len``,
        llama.cpp ``meta.n_ctx``)."""
        window = listed.get("max_model_len") or (listed.get("meta") or {}).get("n_ctx")
        return ServerFacts(int(window) if window else None)

    def render(self, client: httpx.Client, root: str, model: str, messages: list[dict[str, str]], kwargs: dict[str, Any],
               detokenize: Callable[[Sequence[int]], str]) -> str | None:
        """The server's rendering of the chat template, None where it has none (blocking HTTP;
        httpx errors and bad JSON are the caller's to handle)."""
        return None

    def listed_eos(self, chunk: Chunk, ids: Sequence[int]) -> int | None:
        """The id of an EOS the server names nowhere but lists as a chunk's last token."""
        return None

    def chat_body(self, model: str, messages: list[dict[str, Any]], prefix: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """The body of a chat request that answers ``messages`` with ``fields`` (tools, sampling...),
        continuing the assistant's ``prefix`` (the reasoning so far) when it is not empty; None when
        this server cannot continue one."""
        if not prefix:
            return {"model": model, "messages": messages, **fields}
        if not self.continues_chat:
            return None
        return {"model": model, "messages": [*messages, {"role": "assistant", "content": prefix}], **fields,
                "continue_final_message": True, "add_generation_prompt": False}

    def sampling_fields(self, sampling: Sampling) -> dict[str, Any]:
        fields: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}
        if sampling.top_k:
            fields["top_k"] = sampling.top_k
        return fields

    def step_request(self, max_tokens: int, stops: list[str], streamed: bool) -> Request:
        """A step: streamed (with the stops that fit, where the server keeps them in the output),
        or one plain answer of at most ``PLAIN_REQUEST_TOKENS`` that a server-side stop string ends
        at a boundary candidate."""
        fields: dict[str, Any] = {**self.token_ids, "logprobs": 1} if self.step_ids is None else dict(self.step_ids)
        if stops and self.keep_stops is not None:
            fields.update(stop=stops, **self.keep_stops)
        if streamed:
            return Request(COMPLETIONS, {**fields, "max_tokens": max_tokens}, parse_choice, True)
        return Request(COMPLETIONS, {**fields, "max_tokens": min(max_tokens, PLAIN_REQUEST_TOKENS)}, parse_choice, False)

    def probe_request(self, max_tokens: int) -> Request:
        """A probe, greedy with logprobs: plain with the stop "}" where the server keeps it in the
        output; elsewhere streamed and closed at the brace."""
        fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1, **self.token_ids}
        if self.keep_stops is not None:
            return Request(COMPLETIONS, {**fields, "stop": ["}"], **self.keep_stops}, parse_choice, False)
        return Request(COMPLETIONS, fields, parse_choice, True)

    def tokenizer_routes(self, kind: str) -> Sequence[Route]:
        """Where to (de)tokenize: the server's own route, else every known one in turn."""
        own = self.tokenize if kind == "tokenize" else self.detokenize
        if own is not None:
            return (own,)
        return TOKENIZE_ROUTES if kind == "tokenize" else DETOKENIZE_ROUTES


class VLLM(Dialect):
    name = "vllm"
    token_ids = {"return_tokens_as_token_ids": True}
    step_ids = {"return_token_ids": True}
    keep_stops = {"include_stop_str_in_output": True}
    tokenize = _openai_tokenize("/tokenize")
    detokenize = Route("/detokenize", lambda ids, model: {"model": model, "tokens": ids}, "prompt")

    continues_chat = True

    def render(self, client: httpx.Client, root: str, model: str, messages: list[dict[str, str]], kwargs: dict[str, Any],
               detokenize: Callable[[Sequence[int]], str]) -> str | None:
        tools, kwargs = _tools_apart(kwargs)
        body = {"model": model, "messages": messages, "add_generation_prompt": True, "add_special_tokens": False,
                "chat_template_kwargs": kwargs, **tools}
        r = client.post(root + "/tokenize", json=body)  # with messages, vLLM renders the template
        return detokenize(r.json()["tokens"]) if r.status_code == 200 and "tokens" in r.json() else None

    def listed_eos(self, chunk: Chunk, ids: Sequence[int]) -> int | None:
        # vLLM names no EOS but lists the one it stopped at, last, with no stop_reason
        return ids[-1] if chunk.finish == "stop" and chunk.stop is None and ids else None


class SGLang(Dialect):
    name = "sglang"
    token_ids = {"return_token_ids": True}
    step_ids = token_ids
    keep_stops = {"no_stop_trim": True}
    tokenize = _openai_tokenize("/v1/tokenize")
    detokenize = Route("/v1/detokenize", lambda ids, model: {"model": model, "tokens": ids, "skip_special_tokens": False}, "text")
    continues_chat = True


class LlamaCpp(Dialect):
    """llama.cpp's ``llama-server``: ids and token bytes in chat-format logprobs; plain steps on its
    native ``/completion``, which lists every generated id (a trimmed stop string's too)."""

    name = "llamacpp"
    tokenize = Route("/tokenize", lambda text, model: {"content": text, "add_special": False, "parse_special": True,
                                                       "with_pieces": True}, "tokens")
    detokenize = Route("/detokenize", lambda ids, model: {"tokens": ids}, "content")

    @property
    def plain_steps(self) -> bool:
        return True

    def facts(self, client: httpx.Client, root: str, listed: dict[str, Any]) -> ServerFacts:
        """``/props``: the context window, the EOS token's text and the chat template."""
        window = super().facts(client, root, listed).window
        try:
            r = client.get(root + "/props")
            props = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            props = {}
        window = (props.get("default_generation_settings") or {}).get("n_ctx") or window
        eos = props.get("eos_token")
        return ServerFacts(int(window) if window else None, str(props.get("chat_template") or ""), str(eos) if eos else None)

    def render(self, client: httpx.Client, root: str, model: str, messages: list[dict[str, str]], kwargs: dict[str, Any],
               detokenize: Callable[[Sequence[int]], str]) -> str | None:
        tools, kwargs = _tools_apart(kwargs)
        r = client.post(root + "/apply-template", json={"messages": messages, "chat_template_kwargs": kwargs, **tools})
        return str(r.json()["prompt"]) if r.status_code == 200 and "prompt" in r.json() else None

    def step_request(self, max_tokens: int, stops: list[str], streamed: bool) -> Request:
        if streamed:
            # chat-format logprobs: the only place its stream says each token's exact bytes (the
            # native stream's ``tokens`` come without, and ``/detokenize`` answers U+FFFD for a
            # token that holds part of a character); n_probs 1 costs it no measurable speed
            return super().step_request(max_tokens, stops, streamed)
        fields = {"n_predict": min(max_tokens, PLAIN_REQUEST_TOKENS), "stop": stops or None, "return_tokens": True,
                  "n_probs": 1, "cache_prompt": True}
        return Request("/completion", fields, parse_native, False)


def _tools_apart(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An agent's ``tools`` (a template argument to a tokenizer) as the body field servers read."""
    rest = {k: v for k, v in kwargs.items() if k != "tools"}
    return ({"tools": kwargs["tools"]} if kwargs.get("tools") else {}), rest


# llama-cpp-python's server (``owned_by: me``, no dialect of its own): its tokenizer routes only
_EXTRAS_TOKENIZE = Route("/extras/tokenize", lambda text, model: {"input": text}, "tokens")
_EXTRAS_DETOKENIZE = Route("/extras/detokenize", lambda ids, model: {"tokens": ids}, "text")

DIALECTS: dict[str, Dialect] = {d.name: d for d in (LlamaCpp(), VLLM(), SGLang())}  # routes tried in this order
GENERIC = Dialect()
TOKENIZE_ROUTES = tuple(r for r in [*(d.tokenize for d in DIALECTS.values()), _EXTRAS_TOKENIZE] if r is not None)
DETOKENIZE_ROUTES = tuple(r for r in [*(d.detokenize for d in DIALECTS.values()), _EXTRAS_DETOKENIZE] if r is not None)


def dialect_for(owned_by: str) -> Dialect:
    """The dialect of a server whose ``/v1/models`` says ``owned_by``; the generic one if unknown."""
    return DIALECTS.get(owned_by.lower(), GENERIC)
