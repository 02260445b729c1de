"""Benchmark: codestop's client CPU per reasoning token on the overlapped stream, against vLLM
started with ``--stream-interval 1`` (one token per server-sent event) and ``8``.

Starts vLLM (the tests' CPU build and SmolLM2-135M, bench/tests_vllm.py) once per interval,
answers the first GSM8K questions with CoDE-Stop set never to stop (a probe every 16 tokens),
and prints this process's CPU seconds per reasoning token (vLLM runs in its own process) and a
fingerprint of each reasoning text (identical across intervals: the same tokens, read in bigger
events). SmolLM2 is not a reasoning model: only the plumbing is measured.

Usage: python bench/stream_interval.py [--data GSM8K.jsonl] [--n 4] [--intervals 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from tests_vllm import model_dir, start_vllm

from codestop.config import GenerationConfig
from codestop.controller import agenerate
from codestop.engines.server import ServerEngine
from codestop.policies import make_policy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(os.environ.get("CODESTOP_SHARED_DATA", "../shared/data")) / "gsm8k_test.jsonl"))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--intervals", default="1,8")
    args = ap.parse_args()
    questions = [json.loads(line)["question"] for line in Path(args.data).read_text().splitlines()[: args.n]]
    policy = make_policy("codestop", r_min=1.0, r_max=1.0, tau=1e9)  # probes, never stops
    config = GenerationConfig(max_reasoning_tokens=192, probe_interval=16, temperature=0)
    print("| --stream-interval | reasoning tokens | client CPU (ms per token) | wall (s) | reasoning fingerprints |")
    print("|---:|---:|---:|---:|---|")
    for interval in (int(x) for x in args.intervals.split(",")):
        with ExitStack() as stack:
            url = start_vllm(stack, "--stream-interval", str(interval))
            engine = ServerEngine.connect(url, tokenizer=str(model_dir()))
            asyncio.run(agenerate(engine, "Say hi.", policy, config))  # warm: connections, caches
            c0, t0 = time.process_time(), time.perf_counter()
            results = [asyncio.run(agenerate(engine, q, policy, config)) for q in questions]
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            tokens = sum(r.tokens["reasoning"] for r in results)
            prints = " ".join(hashlib.sha256(r.reasoning_text.encode()).hexdigest()[:6] for r in results)
            print(f"| {interval} | {tokens} | {1000 * cpu / tokens:.2f} | {wall:.1f} | {prints} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
