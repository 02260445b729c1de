"""Benchmark: codestop's client CPU per reasoning token on the overlapped stream, against vLLM
started with ``--stream-interval 1`` (one token per server-sent event) and ``8``.

Starts vLLM (the tests' CPU build and SmolLM2-135M, tests/vllm_server.py) once per interval,
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
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vllm_server as V  # the tests' vLLM: install with tests/install_vllm.sh

from codestop.config import GenerationConfig
from codestop.controller import agenerate
from codestop.engines.server import ServerEngine
from codestop.policies import make_policy


def start(interval: int, port: int) -> subprocess.Popen[bytes]:
    python = V.vllm_python()
    if python is None:
        raise SystemExit(V.INSTALL_HINT)
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(V.model_dir()),
            "--served-model-name", V.SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "2048", "--enforce-eager", "--enable-prefix-caching", "--stream-interval", str(interval)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(V.cache_root() / "vllm-cache"),
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited with {proc.returncode}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("vLLM did not come up in 300 s")


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
    for port, interval in enumerate((int(x) for x in args.intervals.split(",")), start=8601):
        proc = start(interval, port)
        try:
            engine = ServerEngine.connect(f"http://127.0.0.1:{port}/v1", tokenizer=str(V.model_dir()))
            asyncio.run(agenerate(engine, "Say hi.", policy, config))  # warm: connections, caches
            c0, t0 = time.process_time(), time.perf_counter()
            results = [asyncio.run(agenerate(engine, q, policy, config)) for q in questions]
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            tokens = sum(r.tokens["reasoning"] for r in results)
            prints = " ".join(hashlib.sha256(r.reasoning_text.encode()).hexdigest()[:6] for r in results)
            print(f"| {interval} | {tokens} | {1000 * cpu / tokens:.2f} | {wall:.1f} | {prints} |", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
