"""Benchmark: llama.cpp's fast CPU path (extra buffer types) against the fallback without it (issue 26).

Where the fast path (AMX tiles, weights repacked for AVX-512/AVX2) dies, the llama.cpp engine loads
models with ``use_extra_bufts = False`` (:mod:`codestop.engines.native_check`). This measures what
that costs on this host, through the engine itself: prompt reading (one 256-token prompt into a
fresh context) and generation (64 greedy tokens, one ``llama_decode`` each). The two settings are
timed alternately, ``--repeats`` times each, and the median is printed; the load average is printed
before and after, because other processes on the same cores skew every figure. Besides tokens per
second of wall time it prints tokens per CPU-second of this process (``time.process_time``: the
work done, which other processes on the cores change much less; OMP_WAIT_POLICY=PASSIVE keeps
threads that wait at a barrier from counting as work).

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


def measure(engine: LlamaCppEngine) -> tuple[float, float, float, float]:
    """Prompt and generated tokens per wall second, then per CPU-second, one run."""
    prompt = [(i * 7 + 11) % engine.n_vocab for i in range(PROMPT_TOKENS)]  # any tokens: cost is per token
    t0, c0 = time.perf_counter(), time.process_time()
    backend = engine.new_backend(prompt)
    t1, c1 = time.perf_counter(), time.process_time()
    try:
        for _ in range(DECODE_TOKENS):
            backend.feed([int(np.argmax(backend.logits()))])
        t2, c2 = time.perf_counter(), time.process_time()
    finally:
        backend.close()
    return PROMPT_TOKENS / (t1 - t0), DECODE_TOKENS / (t2 - t1), PROMPT_TOKENS / (c1 - c0), DECODE_TOKENS / (c2 - c1)


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
        verdict = native_check.run_child(native_check.FAST, location, args.threads)
        if verdict != "ok":  # a host whose fast path faults: it would kill this process
            print(f"{name}: the fast path fails here ({verdict}); measuring the fallback only")
        engines = {s: load(location, s, args.threads) for s in SETTINGS if verdict == "ok" or s != "fast"}
        for engine in engines.values():
            measure(engine)  # warm-up: first-touch of the weights, the context pool
        runs: dict[str, list[tuple[float, float, float, float]]] = {s: [] for s in engines}
        for _ in range(args.repeats):
            for setting, engine in engines.items():  # alternate, so a load spike hits both
                runs[setting].append(measure(engine))
        build = next(iter(engines.values())).build_info
        for setting, engine in engines.items():
            medians = [statistics.median(r[i] for r in runs[setting]) for i in range(4)]
            rows.append((name, setting, medians, [f"{r[0]:.0f}/{r[1]:.1f}" for r in runs[setting]]))
            engine.close()
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{build}; {args.threads} threads, median of {args.repeats}; tokens per wall second and per CPU-second")
    head = f"prompt {PROMPT_TOKENS}"
    print(f"{'model':<20} {'path':<15} {head + ' tok/s':>17} {'decode tok/s':>13} {head + ' tok/CPU-s':>21} "
          f"{'decode tok/CPU-s':>17}  runs (wall prompt/decode)")
    for name, setting, m, each in rows:
        print(f"{name:<20} {setting:<15} {m[0]:>17.1f} {m[1]:>13.1f} {m[2]:>21.1f} {m[3]:>17.1f}  {' '.join(each)}")


if __name__ == "__main__":
    main()
