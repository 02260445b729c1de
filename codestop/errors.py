"""The errors a user can cause and fix. The CLI prints their message alone (no traceback); the
proxy maps them to HTTP statuses. Modules that only raise or catch them import this module, not
an engine."""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
from urllib.parse import quote


class CodestopError(Exception):
    """An error a user can cause and fix; its message says what to do."""


class ParameterError(CodestopError, ValueError):
    """A value the user gave is not allowed. ``param`` names it as the user wrote it (a field, a
    flag's parameter name, ``codestop.tau``), ``value`` is what was given: the proxy's 400 carries
    both as vLLM's validation errors do, the CLI prints the message."""

    def __init__(self, param: str, value: object, must: str) -> None:
        super().__init__(f"{param}: {value!r} {must}")
        self.param = param
        self.value = value
        self.must = must

    def under(self, prefix: str) -> ParameterError:
        """The same error (of the same kind) with its parameter named under ``prefix`` (e.g. "codestop.")."""
        return type(self)(prefix + self.param, self.value, self.must)


class UnknownParameter(ParameterError):
    """A parameter that does not exist where it was given (a policy knob of another method, an unknown
    ``codestop`` option): the proxy's 400 says ``unknown_parameter``, as for an unknown field."""

    code = "unknown_parameter"


def require(ok: bool, param: str, value: object, must: str) -> None:
    """Raise :class:`ParameterError` unless ``ok``: every validator's one check."""
    if not ok:
        raise ParameterError(param, value, must)


def is_number(x: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ContextTooLong(CodestopError):
    """The prompt, or the reasoning so far, does not fit the model's context window."""


class ServerError(CodestopError):
    """The completions server failed a request; ``status`` is the HTTP status the proxy answers,
    ``upstream_status`` the one the server answered, when it answered."""

    def __init__(self, message: str, status: int = 502, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.upstream_status = upstream_status


class UpstreamRejected(ServerError):
    """The completions server refused a request as malformed (400, 413, 422): a value the client
    sent that the server does not take (a tool_choice naming no tool, a schema it cannot compile,
    a seed out of its range). The client's error: relayed as a 400 with the server's words."""

    def __init__(self, message: str, upstream_status: int) -> None:
        super().__init__(message, 400, upstream_status)


class UpstreamUnauthorized(ServerError):
    """The completions server refused the proxy's own credentials (401, 403): the operator's error,
    which no client can fix, so a 502 (the gateway failed), never the client's 401."""

    def __init__(self, message: str, upstream_status: int) -> None:
        super().__init__(message, 502, upstream_status)


class ServerUnreachable(ServerError):
    """The completions server cannot be reached, or dropped the connection for good."""


class ServerTimeout(ServerError):
    """The completions server did not answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=504)


class ServerBusy(ServerError):
    """The proxy turns a request away for now, with a ``Retry-After`` of ``retry_after`` seconds:
    429 or 503 as the upstream answered after every retry, or 503 when the request waited too long
    for a place in the proxy's own limit or behind the upstream's queue (which is not silence)."""

    def __init__(self, message: str, status: int = 503, retry_after: int = 10, upstream_status: int | None = None) -> None:
        super().__init__(message, status, upstream_status)
        self.retry_after = retry_after


# What looks like a credential in a text codestop relays (an upstream's error message, a URL):
# an Authorization header's value, a Bearer or Basic token, key=value secrets, provider-style keys,
# a URL's password. Each match keeps its name and loses its value (the group named "value"); a value
# of dots or stars is a placeholder, not a credential (the proxy's own "Bearer ..."), and stays.
_SECRETS = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"(?i)(\bauthorization\b[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?(?P<value>[^\s\"',;)}]+)", r"\1[redacted]"),
    (r"(?i)\b(bearer|basic)(\s+)(?P<value>[A-Za-z0-9._~+/=-]{4,})", r"\1\2[redacted]"),
    (r"(?i)(\b(?:x-)?(?:api[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token|client[_-]?secret|secret|password|passwd)"
     r"\b[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"'&,;})\]]+)", r"\1[redacted]"),
    (r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}", "[redacted]"),
    (r"\b(?:hf|gh[pousr]|glpat|xox[abprs])[_-][A-Za-z0-9_-]{16,}", "[redacted]"),
    (r"\bAKIA[0-9A-Z]{16}\b", "[redacted]"),
    (r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)(?P<value>[^@\s/]+)@", r"\1[redacted]@"),
))
_PLACEHOLDER = re.compile(r"[.*\u2026]+[)\]}]*")  # dots or stars, and a bracket that closes the text around them


def _redacted(match: re.Match[str], replacement: str) -> str:
    value = match.groupdict().get("value")
    return match.group(0) if value is not None and _PLACEHOLDER.fullmatch(value) else match.expand(replacement)


# The keys codestop was given (an upstream's api_key, the proxy's own key): removed literally,
# whatever their shape, from every text redact() sees. A key shorter than this is not one anyone
# could mean (removing "x" would garble every message); it is left alone.
MIN_SECRET_CHARS = 4
_registered: set[str] = set()
_registered_re: re.Pattern[str] | None = None
_lock = threading.Lock()


def register_secret(key: str | None) -> None:
    """Remove ``key`` from every text :func:`redact` sees from now on in this process, as written
    and as JSON or a URL would quote it (an upstream's error may echo it either way)."""
    global _registered_re
    if not isinstance(key, str) or len(key.strip()) < MIN_SECRET_CHARS:
        return
    forms = {key, key.strip(), json.dumps(key)[1:-1], quote(key, safe="")}
    with _lock:
        if forms <= _registered:
            return
        _registered.update(f for f in forms if len(f) >= MIN_SECRET_CHARS)
        # longest first: a key that contains another is removed whole
        _registered_re = re.compile("|".join(re.escape(f) for f in sorted(_registered, key=len, reverse=True)))


def redact(text: str) -> str:
    """``text`` with every registered key (:func:`register_secret`) and anything else that looks
    like a credential replaced by ``[redacted]``."""
    if _registered_re is not None:
        text = _registered_re.sub("[redacted]", text)
    for pattern, replacement in _SECRETS:
        text = pattern.sub(functools.partial(_redacted, replacement=replacement), text)
    return text


class RedactingFilter(logging.Filter):
    """A log filter that passes every record with its message, traceback and stack redacted, so no
    log line carries a key, whoever formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact(text), None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redact_logs(*names: str) -> None:
    """Put a :class:`RedactingFilter` on the named loggers (once each). A logger's filters see only
    the records logged through it, so every logger that may carry an upstream's text is named."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
