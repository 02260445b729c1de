"""The errors a user can cause and fix. The CLI prints their message alone (no traceback); the
proxy maps them to HTTP statuses. Modules that only raise or catch them import this module, not
an engine."""

from __future__ import annotations


class CodestopError(Exception):
    """An error a user can cause and fix; its message says what to do."""


class ContextTooLong(CodestopError):
    """The prompt, or the reasoning so far, does not fit the model's context window."""


class ServerError(CodestopError):
    """The completions server failed a request; ``status`` is the HTTP status the proxy answers,
    ``upstream_status`` the one the server answered, when it answered."""

    def __init__(self, message: str, status: int = 502, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.upstream_status = upstream_status


class ServerUnreachable(ServerError):
    """The completions server cannot be reached, or dropped the connection for good."""


class ServerTimeout(ServerError):
    """The completions server did not answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=504)
