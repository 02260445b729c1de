"""Benchmark: an upstream's tokens/s on a streamed completion that asks for logprobs (how codestop's
reasoning stream asked before issue 29) against one that asks for token ids only (after), the two
alternated, greedy, the same prompts.

  python bench/stream_logprobs.py vllm URL [--tokens 128] [--concurrency 1,8] [--reps 2]   # a running vLLM's /v1 URL
  python bench/stream_logprobs.py llamacpp [--tokens 128] [--reps 3]    # starts the tests' llama-server (SmolLM2 Q4_1)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [f"Write a numbered list of 100 {w}, one per line.\n1." for w in ("animals", "countries", "fruits", "names")]
VLLM_CASES = {"logprobs 1 + return_tokens_as_token_ids (before)": {"logprobs": 1, "return_tokens_as_token_ids": True},
              "return_token_ids, no logprobs (after)": {"return_token_ids": True}}
LLAMA_CASES = {"/v1/completions with logprobs 1 (the stream, before and after)": ("/v1/completions", {"logprobs": 1}),
               "/completion with return_tokens, no probabilities": ("/completion", {"return_tokens": True})}


async def vllm_stream(c: httpx.AsyncClient, root: str, model: str, prompt: list[int], n: int, fields: dict) -> int:
    got = 0
    body = {"model": model, "prompt": prompt, "max_tokens": n, "min_tokens": n, "temperature": 0, "stream": True, **fields}
    async with c.stream("POST", root + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]):
                got += len(choices[0].get("token_ids") or (choices[0].get("logprobs") or {}).get("tokens") or [])
    return got


async def vllm(args: argparse.Namespace) -> None:
    root = args.url.rstrip("/").removesuffix("/v1")
    async with httpx.AsyncClient(timeout=600) as c:
        model = (await c.get(root + "/v1/models")).json()["data"][0]["id"]
        prompts = [(await c.post(root + "/tokenize", json={"model": model, "prompt": p})).json()["tokens"] for p in PROMPTS]
        for conc in args.concurrency:
            res: dict[str, list[float]] = {k: [] for k in VLLM_CASES}
            for _ in range(args.reps):
                for name, fields in VLLM_CASES.items():
                    t = time.perf_counter()
                    got = await asyncio.gather(*(vllm_stream(c, root, model, prompts[i % 4], args.tokens, fields) for i in range(conc)))
                    res[name].append(sum(got) / (time.perf_counter() - t))
            for name, v in res.items():
                print(f"| vLLM | {conc} | {name} | {statistics.median(v):.0f} | {', '.join(f'{x:.0f}' for x in v)} |", flush=True)


def llamacpp(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import smollm2_gguf
    from llama_servers import LlamaServer

    server = LlamaServer(smollm2_gguf(), slots=1).start()
    try:
        prompt = httpx.post(server.url + "/tokenize", json={"content": PROMPTS[0]}).json()["tokens"]
        res: dict[str, list[float]] = {k: [] for k in LLAMA_CASES}
        for _ in range(args.reps):
            for name, (path, fields) in LLAMA_CASES.items():
                t, events = time.perf_counter(), 0
                body = {"prompt": prompt, "max_tokens": args.tokens, "n_predict": args.tokens, "temperature": 0, "stream": True,
                        "cache_prompt": True, **fields}
                with httpx.stream("POST", server.url + path, json=body, timeout=600) as r:
                    events = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
                res[name].append((events - 1) / (time.perf_counter() - t))
        for name, v in res.items():
            print(f"| llama.cpp | 1 | {name} | {statistics.median(v):.0f} | {', '.join(f'{x:.0f}' for x in v)} |", flush=True)
    finally:
        server.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("server", choices=["vllm", "llamacpp"])
    ap.add_argument("url", nargs="?", help="vllm: a running vLLM's /v1 URL")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    print("| server | concurrency | request | tokens/s (median) | runs |\n|---|---:|---|---:|---|")
    if args.server == "vllm":
        if not args.url:
            ap.error("vllm needs the URL of a running vLLM")
        asyncio.run(vllm(args))
    else:
        llamacpp(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
