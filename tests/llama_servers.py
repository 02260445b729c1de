"""Real llama.cpp servers for the tests: llama.cpp's own ``llama-server`` through xllamacpp
(prebuilt wheels, no compiler), one per subprocess on loopback (``LlamaServer``: kill and start
again on the same port), and ``FaultProxy``, an HTTP proxy in front of one that injects a fault at
a time. Used by tests/test_server_engine.py, test_serve.py, test_vllm.py and test_replicas.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from harness import free_port, serve_in_thread

# llama.cpp's own HTTP server, started through xllamacpp (prebuilt wheels, no compiler needed)
LAUNCH = """
import sys, time, xllamacpp
gguf, port, slots, n_ctx, ubatch, api_key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
p = xllamacpp.CommonParams()
p.model.path = gguf
p.port = port
p.n_parallel = slots
p.n_ctx = n_ctx * slots
p.cpuparams.n_threads = 1
p.cpuparams_batch.n_threads = 1
p.endpoint_metrics = True
if ubatch:
    p.n_ubatch = ubatch
if api_key:
    p.api_keys = [api_key]
server = xllamacpp.Server(p)
print("listening", server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


class LlamaServer:
    """A real llama.cpp server in a subprocess; ``kill`` and ``start`` again on the same port."""

    def __init__(self, gguf: Path, slots: int = 4, n_ctx: int = 2048, port: int | None = None, ubatch: int = 0,
                 api_key: str = "") -> None:
        """``ubatch``: llama.cpp's n_ubatch (0: its default); 1 computes every token alone, so greedy
        output no longer depends on what shares a batch or which slot's cache a request reuses.
        ``api_key``: the key it demands (llama-server's ``--api-key``; its /health and /v1/models
        stay open)."""
        self.gguf, self.slots, self.n_ctx, self.ubatch, self.api_key = gguf, slots, n_ctx, ubatch, api_key
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        args = [sys.executable, "-c", LAUNCH, str(self.gguf), str(self.port), str(self.slots), str(self.n_ctx), str(self.ubatch), self.api_key]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("llama.cpp server did not come up in 120 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class FaultProxy:
    """An HTTP proxy in front of the real server that injects one kind of fault at a time.

    mode: "pass"; "reject_ids" (422 for token-id prompts, as llama-cpp-python's server answers);
    "status_once" (one 503, then pass); "busy" (every completion a 429 with ``Retry-After: 1``); "drop_once" (cut the next stream after a few events);
    "hang" (never answer a completion); "hang_all" (never answer anything: a stopped server);
    "no_logprobs" (strip log-probabilities from answers); "slow" (a server making slow progress: each
    streamed line, and each token of a plain answer, ``delay`` seconds late, so a generation outlasts
    a short timeout on any host however fast or loaded). ``seen``: every completion request's body
(the chat endpoint's included: the faults hit it too)."""

    def __init__(self, upstream: str, port: int | None = None) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.delay = 0.05
        self.seen: list[dict] = []
        self.port = port or free_port()
        app = FastAPI()
        client = httpx.AsyncClient(timeout=60)

        @app.get("/{path:path}")
        async def get(path: str) -> Response:
            if self.mode == "hang_all":
                await asyncio.sleep(3600)
            r = await client.get(f"{upstream}/{path}")
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

        @app.post("/{path:path}")
        async def post(path: str, request: Request) -> Response:
            body = await request.json()
            mode = self.mode
            if mode == "hang_all":
                await asyncio.sleep(3600)
            if path in ("v1/completions", "completion", "v1/chat/completions"):  # OpenAI-style, llama.cpp's native, agents' chat
                self.seen.append(body)
                if mode == "reject_ids" and isinstance(body.get("prompt"), list):
                    return JSONResponse({"detail": [{"loc": ["body", "prompt"], "msg": "str type expected"}]}, 422)
                if mode == "status_once":
                    self.mode = "pass"
                    return JSONResponse({"error": {"message": "busy"}}, 503)
                if mode == "busy":
                    return JSONResponse({"error": {"message": "too many requests"}}, 429, headers={"retry-after": "1"})
                if mode == "hang":
                    await asyncio.sleep(3600)
            if not body.get("stream"):
                r = await client.post(f"{upstream}/{path}", json=body)
                data = r.json()
                if mode == "slow":
                    await asyncio.sleep(self.delay * (data.get("usage") or {}).get("completion_tokens", 1))
                if mode == "no_logprobs":
                    for c in data.get("choices", []):
                        c["logprobs"] = None
                return JSONResponse(data, r.status_code)
            if mode == "drop_once":
                self.mode = "pass"

            async def relay():
                n = 0
                async with client.stream("POST", f"{upstream}/{path}", json=body) as r:
                    async for line in r.aiter_lines():
                        n += 1
                        if mode == "slow" and line:
                            await asyncio.sleep(self.delay)
                        if mode == "drop_once" and n > 6:
                            raise ConnectionResetError("fault injected: stream cut")
                        if mode == "no_logprobs" and line.startswith("data: {"):
                            event = json.loads(line[6:])
                            for c in event.get("choices", []):
                                c["logprobs"] = None
                            line = "data: " + json.dumps(event)
                        yield line + "\n"

            return StreamingResponse(relay(), media_type="text/event-stream")

        self.server, self.thread = serve_in_thread(app, self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True  # do not wait for a request left hanging on purpose
        self.thread.join(timeout=10)
