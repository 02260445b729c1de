"""A load generator for bench/proxy_cpu.py: an upstream that answers the proxy's requests with
RECORDED real responses, byte for byte (token ids and logprobs included), as fast as the client
reads. It is a load generator for that benchmark only, never a stand-in for a server in any test.

Two modes:

* ``record``: a pass-through in front of a real server (vLLM, llama.cpp's llama-server): every
  request the proxy sends is forwarded, and the request with the server's answer (status, content
  type, the whole body: a stream's server-sent events as the server wrote them) is appended to a
  JSONL recording.
* ``serve``: answers from a recording, a stream's events all at once (``--pace-ms``: one at a
  time, that far apart, as a server generating at that pace). A request is matched by its method, path and JSON body
  (canonical: keys sorted), so the same workload run again (the proxy is deterministic, the
  recorded sampling greedy) is answered exactly as the real server answered it. A completion
  that was not recorded gets the longest recorded stream cut to its ``max_tokens`` (a stream),
  else a recorded plain answer of the same shape (a probe, stop ``}``; else a step), in turn;
  anything else unrecorded is a 404. ``GET /replay/stats`` says how many requests matched.

The HTTP server is a few lines of asyncio (HTTP/1.1, keep-alive, Content-Length bodies), so the
load generator costs far less CPU than the proxy it drives.

Usage:
  python bench/upstream_replay.py record --upstream http://127.0.0.1:8311 --out bench/recordings/vllm.jsonl [--port 8701]
  python bench/upstream_replay.py serve --recording bench/recordings/vllm.jsonl [--port 8702]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REASONS = {200: "OK", 404: "Not Found", 502: "Bad Gateway"}


def request_key(method: str, path: str, body: bytes) -> str:
    """What a request is matched by: its method, path and canonical JSON body."""
    try:
        canon = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")) if body else ""
    except ValueError:
        canon = body.decode("utf-8", "replace")
    return f"{method} {path} {canon}"


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


@dataclass
class Recording:
    """The answers of one recording, by request key, and the fallbacks for completions."""

    answers: dict[str, Answer] = field(default_factory=dict)
    streams: list[Stream] = field(default_factory=list)
    plain: dict[str, list[Answer]] = field(default_factory=dict)  # recorded plain completions by shape
    hits: int = 0
    fallbacks: int = 0
    misses: int = 0
    _turns: dict[str, Iterator[Answer]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Recording:
        rec = cls()
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "request" not in entry:
                continue  # the header
            body = json.dumps(entry["request"]).encode() if entry["request"] is not None else b""
            answer = Answer(entry["status"], entry["content_type"], entry["body"].encode())
            rec.answers.setdefault(request_key(entry["method"], entry["path"], body), answer)
            if entry["status"] != 200 or entry["method"] != "POST" or not isinstance(entry["request"], dict):
                continue
            req = entry["request"]
            if req.get("stream"):
                rec.streams.append(Stream.parse(req.get("prompt"), answer.body))
            elif entry["path"] in ("/v1/completions", "/completion"):
                rec.plain.setdefault(shape(entry["path"], req), []).append(answer)
        rec.streams.sort(key=lambda st: len(st.events), reverse=True)
        return rec

    def answer(self, method: str, path: str, body: bytes) -> Answer:
        found = self.answers.get(request_key(method, path, body))
        if found is not None:
            self.hits += 1
            return found
        if path == "/replay/stats":
            return Answer(200, "application/json", json.dumps(
                {"hits": self.hits, "fallbacks": self.fallbacks, "misses": self.misses}).encode())
        req: Any = None
        if method == "POST" and path in ("/v1/completions", "/completion"):
            try:
                req = json.loads(body)
            except ValueError:
                pass
        if isinstance(req, dict):
            if req.get("stream") and self.streams:
                self.fallbacks += 1
                events = continuation(self.streams, req.get("prompt"))
                return Answer(200, "text/event-stream", cut(events, int(req.get("max_tokens") or 1 << 30)))
            turns = self.plain.get(shape(path, req))
            if turns:
                self.fallbacks += 1
                if shape(path, req) not in self._turns:
                    self._turns[shape(path, req)] = itertools.cycle(turns)
                return next(self._turns[shape(path, req)])
        self.misses += 1
        print(f"not recorded: {method} {path} {body[:300]!r}", file=sys.stderr, flush=True)
        return Answer(404, "application/json", json.dumps({"error": {"message": f"not recorded: {method} {path}"}}).encode())


@dataclass
class Stream:
    """A recorded stream: its prompt (token ids, when sent as ids), its events and their token ids."""

    prompt: list[int] | None
    events: list[bytes]
    ids: list[list[int]]

    @classmethod
    def parse(cls, prompt: Any, body: bytes) -> Stream:
        events = [e + b"\n\n" for e in body.split(b"\n\n") if e.strip()]
        ids = []
        for event in events:
            try:
                choices = json.loads(event[5:]).get("choices") or [{}]
                lp = choices[0].get("logprobs") or {}
                ids.append([int(t[9:]) if isinstance(t, str) and t.startswith("token_id:") else -1
                            for t in lp.get("tokens") or []] or [e.get("id", -1) for e in lp.get("content") or []])
            except ValueError:
                ids.append([])
        return cls(prompt if isinstance(prompt, list) else None, events, ids)


def continuation(streams: list[Stream], prompt: Any) -> list[bytes]:
    """The events a stream would send after ``prompt``: a recorded stream whose prompt and first
    generated tokens make up ``prompt`` continues after them; else the longest recorded stream."""
    if isinstance(prompt, list):
        for st in streams:
            if st.prompt is None or prompt[: len(st.prompt)] != st.prompt:
                continue
            rest, k = prompt[len(st.prompt):], 0
            for i, ids in enumerate(st.ids):
                if not rest[k:]:
                    return st.events[i:]
                if rest[k : k + len(ids)] != ids:
                    break
                k += len(ids)
    return streams[0].events


def shape(path: str, req: dict[str, Any]) -> str:
    """The kind of a plain completion: a probe (greedy, stopped at "}") or a step."""
    return f"{path} {'probe' if req.get('stop') == ['}'] else 'step'}"


def cut(events: list[bytes], max_tokens: int) -> bytes:
    """A recorded stream's events up to ``max_tokens`` tokens, then its end."""
    out: list[bytes] = []
    n = 0
    for event in events:
        if event.startswith(b"data: [DONE]"):
            break
        out.append(event)
        try:
            choices = json.loads(event[5:]).get("choices") or [{}]
            lp = choices[0].get("logprobs") or {}
            n += len(lp.get("tokens") or lp.get("content") or [0])
        except ValueError:
            pass
        if n >= max_tokens:
            break
    return b"".join(out) + b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# The HTTP server (both modes)
# --------------------------------------------------------------------------------------------


async def serve_http(port: int, respond: Any) -> None:
    """``respond(method, path, body, writer)`` answers one request: an :class:`Answer` sent whole,
    or None when it wrote the response itself."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = dict((k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:] if h))
                n = int(headers.get("content-length") or 0)
                body = await reader.readexactly(n) if n else b""
                answer = await respond(method, target.split("?", 1)[0], body, writer)
                if answer is None:
                    continue
                writer.write(status_line(answer.status, answer.content_type, f"content-length: {len(answer.body)}")
                             + answer.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def status_line(status: int, content_type: str, length: str) -> bytes:
    return f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: {content_type}\r\n{length}\r\n\r\n".encode()


def record(upstream: str, out: Path, port: int) -> None:
    """Forward every request to ``upstream``; a stream is passed on as it arrives (chunked) until
    the client closes it, and what was passed on is recorded."""
    import httpx

    out.parent.mkdir(parents=True, exist_ok=True)
    sink = out.open("a")
    if out.stat().st_size == 0:
        sink.write(json.dumps({"recorded_from": upstream}) + "\n")
    seen: set[str] = set()
    client = httpx.AsyncClient(base_url=upstream.rstrip("/").removesuffix("/v1"), timeout=600)

    def keep(method: str, path: str, body: bytes, answer: Answer) -> None:
        key = request_key(method, path, body)
        if key not in seen:
            seen.add(key)
            sink.write(json.dumps({"method": method, "path": path, "request": json.loads(body) if body else None,
                                   "status": answer.status, "content_type": answer.content_type,
                                   "body": answer.body.decode()}) + "\n")
            sink.flush()

    async def respond(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> Answer | None:
        request = client.build_request(method, path, content=body or None,
                                       headers={"content-type": "application/json"} if body else None)
        r = await client.send(request, stream=True)
        ctype = r.headers.get("content-type", "application/json")
        if not ctype.startswith("text/event-stream"):
            answer = Answer(r.status_code, ctype, await r.aread())
            keep(method, path, body, answer)
            return answer
        sent = b""
        try:
            writer.write(status_line(r.status_code, ctype, "transfer-encoding: chunked"))
            async for part in r.aiter_bytes():
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
                sent += part
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            await r.aclose()
            cut_at = sent.rfind(b"\n\n")  # whole events only
            keep(method, path, body, Answer(r.status_code, ctype, sent[: cut_at + 2] if cut_at != -1 else b""))
        return None

    asyncio.run(serve_http(port, respond))


def replay(recordings: list[Path], port: int, pace_ms: float = 0.0, per_write: int = 1) -> None:
    """Answer from ``recordings``; ``pace_ms`` > 0: a stream's events are sent ``per_write`` at a
    time (1: as recorded, one token per event; 8: about what vLLM's ``--stream-interval 8`` sends
    at once, though it merges them into one event), writes that many milliseconds apart; else all
    at once."""
    rec = Recording()
    for path in recordings:
        one = Recording.load(path)
        for k, v in one.answers.items():
            rec.answers.setdefault(k, v)
        rec.streams += one.streams
        for k, vs in one.plain.items():
            rec.plain.setdefault(k, []).extend(vs)
    rec.streams.sort(key=lambda st: len(st.events), reverse=True)

    async def respond(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> Answer | None:
        answer = rec.answer(method, path, body)
        if pace_ms <= 0 or not answer.content_type.startswith("text/event-stream"):
            return answer
        writer.write(status_line(answer.status, answer.content_type, "transfer-encoding: chunked"))
        events = [e + b"\n\n" for e in answer.body.split(b"\n\n") if e.strip()]
        for i in range(0, len(events), per_write):
            part = b"".join(events[i : i + per_write])
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()
            await asyncio.sleep(pace_ms / 1000)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return None

    asyncio.run(serve_http(port, respond))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("record", help="forward to a real server and record what it answers")
    r.add_argument("--upstream", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--port", type=int, default=8701)
    s = sub.add_parser("serve", help="answer from recordings")
    s.add_argument("--recording", type=Path, action="append", required=True)
    s.add_argument("--port", type=int, default=8702)
    s.add_argument("--pace-ms", type=float, default=0.0,
                   help="send a stream's events this many ms apart (default 0: all at once, as fast as the client reads)")
    s.add_argument("--events-per-write", type=int, default=1, help="with --pace-ms: events sent together (default 1)")
    args = ap.parse_args()
    try:
        if args.mode == "record":
            record(args.upstream, args.out, args.port)
        else:
            replay(args.recording, args.port, args.pace_ms, args.events_per_write)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
