"""The completions-server engine (split into modules in the next commit)."""

from codestop.engines.server.engine import *  # noqa: F403
from codestop.engines.server.engine import HFTokens, RemoteTokens, ServerEngine, parse_choice, parse_logprobs  # noqa: F401
