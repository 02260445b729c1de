"""The server's own tokenizer over HTTP, for a server engine given no Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import httpx

from codestop.engines.server.dialects import GENERIC, Dialect, Route
from codestop.engines.server.transport import timeout_error, upstream_error
from codestop.errors import CodestopError, ServerError, ServerUnreachable

_MISSING = object()
# set while the engine tries a tokenizer call on the event loop: an answer not cached raises WouldBlock
NO_BLOCKING: ContextVar[bool] = ContextVar("codestop_no_blocking", default=False)


class WouldBlock(Exception):
    """A tokenizer or template call would block on HTTP where it may not (the engine then makes it
    in a worker thread)."""


def check_blocking() -> None:
    if NO_BLOCKING.get():
        raise WouldBlock()


class RemoteTokens:
    """The server's ``/tokenize`` and ``/detokenize``, cached. The sync methods block (the engine
    calls them in a worker thread); ``atokenize`` and ``fetch`` are their async twins for the event
    loop. Token bytes the server reports (llama.cpp's pieces and logprobs) are exact; a piece
    fetched as text is exact unless the token is part of a character: pass a Hugging Face tokenizer
    for servers that report no token bytes and models that split characters. ``dialect`` says which
    routes to try (the generic one: every known route, the first that answers is kept)."""

    def __init__(self, client: httpx.Client, root: str, model: str, dialect: Dialect = GENERIC) -> None:
        self.client = client
        self.root = root
        self.model = model
        self.dialect = dialect
        self.pieces: dict[int, bytes] = {}
        self.requests = 0
        self._routes: dict[str, Route] = {}  # the route that answered, by kind
        self._cache: dict[str, list[int]] = {}

    def _candidates(self, kind: str) -> Sequence[Route]:
        chosen = self._routes.get(kind)
        return [chosen] if chosen else self.dialect.tokenizer_routes(kind)

    def _answer(self, kind: str, route: Route, r: httpx.Response) -> Any:
        """The answer's value; ``_MISSING`` where the route is not this server's (while the routes
        are tried). An error from the route that answered before, or a refused key on any, is
        the upstream's error (:func:`upstream_error`), not a missing route."""
        if r.status_code != 200 and (r.status_code in (401, 403) or self._routes.get(kind) == route):
            raise upstream_error(r, self.root)
        if r.status_code == 200:
            try:
                data = r.json()
            except ValueError:
                return _MISSING
            if isinstance(data, dict) and route.answer in data:
                self._routes[kind] = route
                return data[route.answer]
        return _MISSING

    def _fail(self, err: Exception | None = None) -> CodestopError:
        if isinstance(err, httpx.TimeoutException):
            return timeout_error(self.root, self.client.timeout, err)
        if err is not None:
            return ServerUnreachable(f"the completions server at {self.root} is unreachable ({type(err).__name__})")
        return CodestopError(
            f"tokenizer: the server at {self.root} offers no /tokenize endpoint codestop knows; "
            "pass --tokenizer with the model's Hugging Face tokenizer"
        )

    def _call(self, kind: str, arg: Any) -> Any:
        check_blocking()
        for route in self._candidates(kind):
            self.requests += 1
            try:
                r = self.client.post(self.root + route.path, json=route.body(arg, self.model))
            except httpx.HTTPError as err:
                raise self._fail(err) from None
            if (value := self._answer(kind, route, r)) is not _MISSING:
                return value
        raise self._fail()

    async def _acall(self, client: httpx.AsyncClient, kind: str, arg: Any) -> Any:
        for route in self._candidates(kind):
            self.requests += 1
            try:
                r = await client.post(self.root + route.path, json=route.body(arg, self.model))
            except httpx.HTTPError as err:
                raise self._fail(err) from None
            if (value := self._answer(kind, route, r)) is not _MISSING:
                return value
        raise self._fail()

    def _ids(self, text: str, raw: Any) -> list[int]:
        ids: list[int] = []
        for item in raw:
            if isinstance(item, dict):  # llama.cpp with_pieces: a string, or bytes when not UTF-8
                ids.append(int(item["id"]))
                piece = item.get("piece")
                if isinstance(piece, (str, list)):
                    self.pieces.setdefault(ids[-1], piece.encode() if isinstance(piece, str) else bytes(piece))
            else:
                ids.append(int(item))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[text] = ids
        return list(ids)

    def tokenize(self, text: str) -> list[int]:
        cached = self._cache.get(text)
        return list(cached) if cached is not None else self._ids(text, self._call("tokenize", text))

    async def atokenize(self, client: httpx.AsyncClient, text: str) -> list[int]:
        cached = self._cache.get(text)
        return list(cached) if cached is not None else self._ids(text, await self._acall(client, "tokenize", text))

    def learn(self, pieces: dict[int, bytes]) -> None:
        for i, piece in pieces.items():
            self.pieces.setdefault(i, piece)

    def knows(self, ids: Sequence[int]) -> bool:
        """Whether every piece of ``ids`` is known (decoding them makes no request)."""
        pieces = self.pieces
        return all(i in pieces for i in ids)

    def missing(self, ids: Sequence[int]) -> list[int]:
        pieces = self.pieces
        return list(dict.fromkeys(i for i in ids if i not in pieces))

    def detokenize(self, ids: Sequence[int]) -> str:
        pieces = self.pieces
        try:  # the hot path: every piece known (the step loop fetches unknown ones first)
            return b"".join([pieces[i] for i in ids]).decode("utf-8", errors="replace")
        except KeyError:
            pass
        for i in self.missing(ids):  # once per token id (special tokens carry no bytes in logprobs)
            pieces[i] = str(self._call("detokenize", [i])).encode()
        return b"".join([pieces[i] for i in ids]).decode("utf-8", errors="replace")

    async def fetch(self, client: httpx.AsyncClient, ids: Sequence[int]) -> None:
        """Fetch the pieces of ``ids`` not known yet, so that decoding them makes no request."""
        for i in self.missing(ids):
            self.pieces[i] = str(await self._acall(client, "detokenize", [i])).encode()


class NotConnected:
    """The tokenizer of an engine that has not reached its server yet (the engine checks first)."""

    def tokenize(self, text: str) -> list[int]:
        raise ServerError("the completions server has not been reached yet", 503)

    def detokenize(self, ids: Sequence[int]) -> str:
        raise ServerError("the completions server has not been reached yet", 503)
