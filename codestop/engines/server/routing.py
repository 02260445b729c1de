"""One routing key on every upstream request of one client request, so a router in front of
engine replicas (vllm-router, SGLang Model Gateway, llm-d, NVIDIA Dynamo, vLLM production-stack)
sends a question's reasoning stream, probes, answer, chat answer and audits to the replica that
holds its prefix. Without it each probe may land on another replica and pay its whole prefix.

:class:`Routing` says how (headers, and for llm-d the token its scheduler hands back); the serve
layer makes one :class:`Route` per client request (:meth:`Routing.route`) and makes it current
(:data:`ROUTE`, a context variable, so tasks started for that request, audits included, inherit
it); :class:`~codestop.engines.server.transport.Transport` adds the current route's headers to
every request it sends and lets it read each answer's. In-process engines send nothing, so
they ignore it. The routers' own names, and where each came from: docs/serving.md, "Behind a router".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

import httpx

from codestop.errors import require

# what each router reads (docs/serving.md "Behind a router" cites the source of each)
ROUTER_HEADERS: dict[str, tuple[str, ...]] = {
    "vllm-router": ("x-session-id",),  # consistent_hash: X-Session-ID first, then X-User-ID, ..., then the body
    "sglang": ("x-smg-routing-key",),  # SGLang Model Gateway's consistent_hashing and manual policies
    "dynamo": ("x-dynamo-session-id",),  # with --router-session-affinity-ttl-secs
    "llm-d": (),  # its scheduler names the pod in its answer: what it handed back is sent back (Route.answered)
    "production-stack": (),  # --routing-logic session --session-key NAME: the header is the operator's
}
ROUTERS = tuple(ROUTER_HEADERS)
# llm-d's session-affinity scorer: the pod it chose, in the answer's x-session-token header (older
# releases) or its llm-d-session cookie (newer ones), sent back on the session's next requests
LLMD_TOKEN_HEADER = "x-session-token"
LLMD_COOKIE = "llm-d-session"
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110's token)
MAX_KEY_CHARS = 256
NO_ROUTER_HEADERS = frozenset({"authorization", "content-type", "content-length", "host", "cookie", "connection",
                               "transfer-encoding", "accept", "accept-encoding", "user-agent"})


@dataclass
class Route:
    """One client request's routing: the headers every upstream request of it carries, and
    whether tokens the router hands back (llm-d's) are kept and sent on its later requests."""

    headers: dict[str, str] = field(default_factory=dict)
    echo: bool = False

    def answered(self, response_headers: httpx.Headers) -> None:
        """Read an upstream answer's headers: llm-d's session token and cookie, sent back from now
        on (the latest: the scheduler hands out another pod's when the last one is gone)."""
        if not self.echo:
            return
        if token := response_headers.get(LLMD_TOKEN_HEADER):
            self.headers[LLMD_TOKEN_HEADER] = token
        for cookie in response_headers.get_list("set-cookie"):
            name, _, rest = cookie.partition("=")
            if name.strip() == LLMD_COOKIE:
                self.headers["cookie"] = f"{LLMD_COOKIE}={rest.split(';', 1)[0].strip()}"


# the current client request's route: set by the serve layer, read by the transport
ROUTE: ContextVar[Route | None] = ContextVar("codestop_route", default=None)


def header_value(key: str) -> str:
    """``key`` as a header value: itself when it is short printable ASCII, else its sha256 (the
    same key always gives the same value, so a client's odd session id still keeps its replica)."""
    if 0 < len(key) <= MAX_KEY_CHARS and key.isascii() and key.isprintable():
        return key
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Routing:
    """How upstream requests name their client request: ``headers`` (lower-case names) carry the
    key; ``echo``: keep and send back the token the router answers with (llm-d)."""

    headers: tuple[str, ...] = ()
    echo: bool = False

    @classmethod
    def of(cls, router: str | None = None, header_names: tuple[str, ...] = ()) -> Routing:
        """The routing for ``router`` (one of :data:`ROUTERS`, or None) and the extra ``header_names``;
        a ParameterError names the one that is wrong (``router``, ``routing_key_header``)."""
        for name in header_names:
            require(isinstance(name, str) and bool(HEADER_NAME.match(name)), "routing_key_header", name,
                    "must be an HTTP header name (letters, digits and !#$%&'*+.^_`|~-), e.g. x-session-id")
            require(name.lower() not in NO_ROUTER_HEADERS, "routing_key_header", name,
                    "is a header the proxy sets itself; name the header your router reads, e.g. x-session-id")
        require(router is None or router in ROUTER_HEADERS, "router", router, f"must be one of {', '.join(ROUTERS)}")
        require(router != "production-stack" or bool(header_names), "router", router,
                "routes on the header its --session-key names: give that name with --routing-key-header NAME")
        names = dict.fromkeys([*ROUTER_HEADERS.get(router or "", ()), *(n.lower() for n in header_names)])
        return cls(tuple(names), router == "llm-d")

    @property
    def on(self) -> bool:
        return bool(self.headers) or self.echo

    def route(self, request_id: str, client_headers: Mapping[str, str], user: object = None) -> Route | None:
        """The route of one client request: its key is the client's own (its value of one of
        these headers, else its ``user``), so a conversation's turns stay on one replica, else
        ``request_id``, unique to this request. llm-d's token or cookie from the client is kept.
        None when routing is off."""
        if not self.on:
            return None
        given = next((client_headers[h] for h in self.headers if client_headers.get(h)), None)
        if given is None and isinstance(user, str) and user:
            given = user
        key = header_value(given if given is not None else request_id)
        route = Route({h: key for h in self.headers}, self.echo)
        if self.echo:
            if token := client_headers.get(LLMD_TOKEN_HEADER):
                route.headers[LLMD_TOKEN_HEADER] = token
            cookies = [c.strip() for c in client_headers.get("cookie", "").split(";")]
            if kept := [c for c in cookies if c.startswith(LLMD_COOKIE + "=")]:
                route.headers["cookie"] = kept[0]
        return route
