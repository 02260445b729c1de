"""Benchmark: llama.cpp's fast CPU path (extra buffer types) against the fallback without it (issue 26).

Where the fast path (AMX tiles, weights repacked for AVX-512/AVX2) dies, the llama.cpp engine loads
models with ``use_extra_bufts = False`` (:mod:`codestop.engines.native_check`). This measures what
that costs on this host, through the engine itself: prompt reading (one 256-token prompt into a
fresh context) and generation (64 greedy tokens, one ``llama_decode`` each). The two settings are
timed alternately, ``--repeats`` times each, and the median is printed; the load average is printed
before and after, because other processes on the same cores skew every figure.

Usage: python bench/llamacpp_bufts.py [--models qwen2.5-coder-0.5b,smollm2-135m] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from codestop.engines import native_check
from codestop.engines.llamacpp import LlamaCppEngine
from codestop.models import resolve_model

PROMPT_TOKENS = 256
DECODE_TOKENS = 64
SETTINGS = {"fast": "1", "no-extra-bufts": "0"}  # the engine's override values


def load(location: str, setting: str, threads: int) -> LlamaCppEngine:
    os.environ[native_check.ENV] = SETTINGS[setting]
    engine = LlamaCppEngine.load(location, threads=threads)
    assert engine.native.name == setting, engine.native
    return engine


def measure(engine: LlamaCppEngine) -> tuple[float, float]:
    """Prompt tokens/s and generated tokens/s, one run."""
    prompt = [(i * 7 + 11) % engine.n_vocab for i in range(PROMPT_TOKENS)]  # any tokens: cost is per token
    t0 = time.perf_counter()
    backend = engine.new_backend(prompt)
    prompt_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            backend.feed([int(np.argmax(backend.logits()))])
        decode_s = time.perf_counter() - t0
    finally:
        backend.close()
    return PROMPT_TOKENS / prompt_s, DECODE_TOKENS / decode_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for name in args.models.split(","):
        location = resolve_model(name).location
        engines = {s: load(location, s, args.threads) for s in SETTINGS}
        for engine in engines.values():
            measure(engine)  # warm-up: first-touch of the weights, the context pool
        runs: dict[str, list[tuple[float, float]]] = {s: [] for s in SETTINGS}
        for _ in range(args.repeats):
            for setting, engine in engines.items():  # alternate, so a load spike hits both
                runs[setting].append(measure(engine))
        build = engines["fast"].build_info
        for setting, engine in engines.items():
            prompt = statistics.median(r[0] for r in runs[setting])
            decode = statistics.median(r[1] for r in runs[setting])
            rows.append((name, setting, prompt, decode, [f"{r[0]:.0f}/{r[1]:.1f}" for r in runs[setting]]))
            engine.close()
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{build}; {args.threads} threads, median of {args.repeats} (runs: prompt/decode tok/s)")
    print(f"{'model':<20} {'path':<15} {f'prompt {PROMPT_TOKENS} tok/s':>18} {'decode tok/s':>13}  runs")
    for name, setting, prompt, decode, each in rows:
        print(f"{name:<20} {setting:<15} {prompt:>18.1f} {decode:>13.1f}  {' '.join(each)}")


if __name__ == "__main__":
    main()
