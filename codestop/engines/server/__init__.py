"""The completions-server engine (vLLM, SGLang, llama.cpp's server; any OpenAI-compatible
``/v1/completions``): :mod:`.engine` the engine (readiness, tokenizer, template, requests),
:mod:`.discovery` what connecting learns, :mod:`.tokenizer` the server's own tokenizer over HTTP,
:mod:`.session` runs a question's
steps and probes, :mod:`.overlap` the overlapped probing, :mod:`.dialects` holds what differs
between server kinds, :mod:`.transport` the HTTP and the parsing of answers, :mod:`.options` the
one validated set of knobs."""

from codestop.engines.server.dialects import Dialect, dialect_for
from codestop.engines.server.engine import ServerEngine, Upstream, api_key_from_env
from codestop.engines.server.options import ServerOptions
from codestop.engines.server.session import ServerSession
from codestop.engines.server.tokenizer import RemoteTokens
from codestop.engines.server.transport import error_message, parse_choice, parse_logprobs
from codestop.engines.tokens import HFTokens
from codestop.errors import ServerError, ServerTimeout, ServerUnreachable

__all__ = [
    "Dialect", "HFTokens", "RemoteTokens", "ServerEngine", "ServerError", "ServerOptions", "ServerSession", "ServerTimeout",
    "ServerUnreachable", "Upstream", "api_key_from_env", "dialect_for", "error_message", "parse_choice", "parse_logprobs",
]
