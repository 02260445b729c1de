"""Connecting: what a completions server serves, read from ``/v1/models`` (the model, its kind,
hence its dialect, and context window) and what the dialect adds (llama.cpp's ``/props``: window,
template, EOS), with the tokenizer to use (the one given, else the server's own)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from codestop.engines.server.dialects import Dialect, dialect_for
from codestop.engines.server.tokenizer import RemoteTokens
from codestop.engines.server.transport import RETRY_STATUSES, error_message, parse_json, timeout_error
from codestop.engines.tokens import HFTokens, Tokens
from codestop.errors import CodestopError, ServerError, ServerUnreachable

API_KEY_ENV = ("CODESTOP_UPSTREAM_API_KEY", "OPENAI_API_KEY")


@dataclass
class Upstream:
    """What connecting learns about the server: the chosen model, its dialect, its tokenizer, every
    model it serves (default: the chosen one), its context window, chat template and EOS ids."""

    model: str
    dialect: Dialect
    tokens: Tokens
    served: Sequence[str] = ()
    window: int | None = None
    template: str = ""
    eos: frozenset[int] = frozenset()


def api_key_from_env() -> str | None:
    """The upstream key from the environment, so it need not be on a command line."""
    return next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)


def load_tokenizer(tokenizer: Any) -> HFTokens | None:
    """The tokenizer given (a name, directory, .gguf file or Hugging Face tokenizer), or None."""
    if tokenizer is None or isinstance(tokenizer, HFTokens):
        return tokenizer
    if isinstance(tokenizer, str):
        return HFTokens.load(tokenizer)
    return HFTokens(tokenizer, getattr(tokenizer, "name_or_path", ""))


def discover(client: httpx.Client, root: str, model: str | None, tokenizer: HFTokens | None) -> Upstream:
    """Read what the server serves (blocking). A server that cannot be reached, or answers
    with a retryable status (a balancer in front of a server still starting), raises
    ServerUnreachable or ServerTimeout; one that answers wrongly, another CodestopError."""
    try:
        r = client.get(root + "/v1/models")
    except httpx.TimeoutException as err:
        raise timeout_error(root, client.timeout, err) from None
    except httpx.HTTPError as err:
        raise ServerUnreachable(
            f"base_url: cannot reach a completions server at {root} ({type(err).__name__}); "
            "check that it is running and the URL (host, port) is right"
        ) from None
    if r.status_code in (401, 403):
        raise CodestopError(
            f"api_key: the server at {root} refused the API key ({r.status_code}); pass --api-key "
            f"or set ${API_KEY_ENV[0]}"
        )
    if r.status_code in RETRY_STATUSES:
        raise ServerUnreachable(f"base_url: {root}/v1/models answered {r.status_code}: {error_message(r)}")
    if r.status_code != 200:
        raise ServerError(f"base_url: {root}/v1/models answered {r.status_code}: {error_message(r)}")
    served = [m for m in (parse_json(r.content, root).get("data") or []) if isinstance(m, dict)]
    if not served:
        raise CodestopError(f"base_url: the server at {root} lists no models")
    names = [str(m.get("id")) for m in served]
    chosen = next((m for m in served if m.get("id") == model), None) if model else served[0]
    if chosen is None:
        raise CodestopError(f"model: the server at {root} does not serve {model!r}; it serves {', '.join(names)}")
    model_id = str(chosen["id"])
    dialect = dialect_for(str(chosen.get("owned_by") or ""))
    facts = dialect.facts(client, root, chosen)
    if tokenizer is not None:
        return Upstream(model_id, dialect, tokenizer, names, facts.window, tokenizer.chat_template_text(),
                        frozenset(tokenizer.eos_ids()))
    tokens = RemoteTokens(client, root, model_id, dialect)
    eos: set[int] = set()
    if facts.eos_text:
        ids = tokens.tokenize(facts.eos_text)
        if len(ids) == 1:
            eos.add(ids[0])
    else:
        tokens.tokenize("a")  # fails clearly now when the server cannot tokenize
    # vLLM says no EOS anywhere: learned from the first completion that stops at it (Dialect.listed_eos)
    return Upstream(model_id, dialect, tokens, names, facts.window, facts.template, frozenset(eos))
