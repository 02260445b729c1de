"""Benchmark: the wall-clock codestop adds to a client (issue 29): time to first token (TTFT),
inter-token latency (ITL, the gap between consecutive streamed chunks that carry text) p50 and p99,
and time per output token (TPOT: first to last text chunk over the tokens after the first), for the
same streamed chat requests sent straight to vLLM and through ``codestop serve`` (vanilla, and
CoDE-Stop set never to stop with overlapped probes, a probe every 32 tokens), at each concurrency,
in one run on one machine: the paths alternate request batch by batch, so a slower or busier moment
hits all of them alike.

The upstream is a running vLLM (``--upstream URL``) or the tests' vLLM CPU server started here
(``--stream-interval N``, tests/vllm_server.py). Every request asks for ``--tokens`` tokens of a
numbered list from SmolLM2-135M-Instruct at temperature 0 (straight: ``max_tokens``; through the
proxy: ``max_reasoning_tokens`` with ``answer: none``: the instruct model's whole reply counts as
reasoning). The proxy and vLLM share this machine's CPUs, so what the proxy computes also slows
vLLM down: on a GPU host that contention is gone (see BENCHMARKS.md).

Usage: python bench/latency.py [--upstream http://127.0.0.1:8000/v1 | --stream-interval 1] [--concurrency 1,16] [--requests 8] [--tokens 96]
Writes bench/results/latency.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from contextlib import ExitStack
from typing import Any

import httpx
from proxy_cpu import NEVER_STOP, PROMPTS, REPO, RESULTS, process, proxy_command, say, wait_up
from tests_vllm import start_vllm

PATHS = ("straight to vLLM", "proxy, vanilla", "proxy, CoDE-Stop never stopping (overlapped probes)")


def payload(path: str, prompt: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if path == PATHS[0]:
        return {**body, "max_tokens": args.tokens}
    policy = {"method": "vanilla"} if path == PATHS[1] else {**NEVER_STOP, "probe_mode": "overlapped"}
    return {**body, "codestop": {**policy, "max_reasoning_tokens": args.tokens, "probe_interval": args.probe_interval, "answer": "none"}}


Timing = tuple[float, list[float], float]  # TTFT, the gaps between text chunks, TPOT (s)


async def one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Timing:
    """One streamed request: its TTFT, the gaps between the chunks that carry text after it, and its
    time per output token after the first."""
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("error"):
                raise RuntimeError(line)
            if data.get("usage"):
                tokens = int(data["usage"]["completion_tokens"])
            delta = (data.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                times.append(time.perf_counter())
    if not times or tokens < 2:
        raise RuntimeError("a stream brought no text or no usage")
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], (times[-1] - times[0]) / (tokens - 1)


async def batch(url: str, bodies: list[dict[str, Any]]) -> list[Timing]:
    """All of ``bodies`` at once (the concurrency is their number)."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(one(client, url, b) for b in bodies))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def run(args: argparse.Namespace, upstream: str) -> list[dict[str, Any]]:
    model = httpx.get(upstream + "/models", timeout=10).json()["data"][0]["id"]
    cmd, env = proxy_command(REPO, upstream, args.port, 1)
    rows = []
    with process(cmd, env, cwd=REPO) as proxy:
        wait_up(f"http://127.0.0.1:{args.port}/health", proxy, "the proxy")
        urls = {PATHS[0]: upstream + "/chat/completions"}
        urls.update({p: f"http://127.0.0.1:{args.port}/v1/chat/completions" for p in PATHS[1:]})
        for path in PATHS:  # warm: connections, the proxy's tokenizer and template caches
            asyncio.run(batch(urls[path], [payload(path, p, model, args) for p in PROMPTS]))
        for c in args.concurrency:
            got: dict[str, list[Timing]] = {p: [] for p in PATHS}
            for i in range(max(1, args.requests // c)):
                for path in PATHS:  # alternating, batch by batch
                    bodies = [payload(path, PROMPTS[(i * c + k) % len(PROMPTS)], model, args) for k in range(c)]
                    got[path] += asyncio.run(batch(urls[path], bodies))
            for path in PATHS:
                ttft = [t for t, _, _ in got[path]]
                itl = [g for _, gaps, _ in got[path] for g in gaps]
                tpot = [t for _, _, t in got[path]]
                row = {"path": path, "concurrency": c, "requests": len(ttft), "ttft_p50_ms": round(pct(ttft, 0.5), 1),
                       "ttft_p99_ms": round(pct(ttft, 0.99), 1), "itl_p50_ms": round(pct(itl, 0.5), 1),
                       "itl_p99_ms": round(pct(itl, 0.99), 1), "tpot_p50_ms": round(pct(tpot, 0.5), 1),
                       "chunks": len(itl) + len(ttft)}
                say(json.dumps(row))
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| path | concurrency | requests | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | TPOT p50 (ms) | text chunks |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['path']} | {r['concurrency']} | {r['requests']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                   f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['tpot_p50_ms']:.1f} | {r['chunks']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", help="a running vLLM's /v1 URL")
    ap.add_argument("--stream-interval", type=int, default=1, help="without --upstream: start the tests' vLLM with this interval")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--requests", type=int, default=8, help="requests per path and concurrency (at least the concurrency)")
    ap.add_argument("--tokens", type=int, default=96, help="tokens each request asks for")
    ap.add_argument("--probe-interval", type=int, default=32)
    ap.add_argument("--port", type=int, default=8760)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with ExitStack() as stack:
        upstream = args.upstream
        if upstream is None:
            upstream = start_vllm(stack, "--stream-interval", str(args.stream_interval))
        rows = run(args, upstream.rstrip("/"))
    print(table(rows))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        meta = {"tokens": args.tokens, "probe_interval": args.probe_interval, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (RESULTS / "latency.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (RESULTS / "latency.md").write_text(f"# Latency added to a client (bench/latency.py, {meta['when']})\n\n{table(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
