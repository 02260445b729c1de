"""The engines side by side on one GGUF: decode speed, probe latency, one question end to end.

    python bench/engines.py [--model qwen2.5-coder-0.5b] [--decode-tokens 128] [--write]

For each engine (llama.cpp in-process; transformers on the same GGUF, dequantized to float32; and,
when installed, xllamacpp's server API as the binding that was not chosen) it measures:

* decode tokens/s: greedy reasoning tokens from one prompt, no boundaries;
* probe latency: the probe prompt plus a greedy answer up to the closing "}", at 4 positions;
* one question end to end: vanilla (no probes) and the same greedy run probed at every blank line
  at several probe intervals without stopping (so both runs are the same length): the probing
  overhead is the extra wall time.

``--write`` replaces the "Engines" section of BENCHMARKS.md with the figures (other sections kept).
The preset models are instruct models, not reasoning models.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# both llama.cpp bindings use OpenMP: let its idle threads sleep (see codestop/engines/llamacpp.py),
# set before either library loads so the comparison is fair
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from codestop.api import agenerate_question  # noqa: E402
from codestop.controller import PROBE_MAX_TOKENS, score  # noqa: E402
from codestop.engines.base import Engine  # noqa: E402
from codestop.families import FAMILIES, PROBE_PROMPT  # noqa: E402
from codestop.models import load_engine, resolve_model  # noqa: E402
from codestop.policies import Vanilla  # noqa: E402
from codestop.sampling import Sampling  # noqa: E402

QUESTION = (
    "A farmer has 6 rows of apple trees with 9 trees in each row. Each tree gives 20 apples. "
    "How many apples does the farmer pick in total?"
)
ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Engines: llama.cpp vs transformers on one GGUF"


async def decode_rate(engine: Engine, n: int) -> float:
    prompt = engine.tokenize(FAMILIES["plain"].build_prompt(engine, QUESTION))
    session = await engine.start(prompt, Sampling(temperature=0.0))
    await session.step(4)  # warm up
    t0 = time.perf_counter()
    out = await session.step(n)
    elapsed = time.perf_counter() - t0
    await session.close()
    return len(out.token_ids) / elapsed


async def probe_latency(engine: Engine, positions: tuple[int, ...] = (32, 64, 96, 128)) -> tuple[float, float]:
    """Mean seconds per probe and mean probe tokens generated, at a few reasoning lengths."""
    prompt = engine.tokenize(FAMILIES["plain"].build_prompt(engine, QUESTION))
    probe_ids = engine.tokenize(PROBE_PROMPT)
    session = await engine.start(prompt, Sampling(temperature=0.0))
    times, tokens, done = [], [], 0
    for pos in positions:
        await session.step(pos - done)
        done = pos
        t0 = time.perf_counter()
        out = await session.probe(probe_ids, PROBE_MAX_TOKENS)
        times.append(time.perf_counter() - t0)
        tokens.append(len(out.token_ids))
        score(out, pos, "geometric", engine)
    await session.close()
    return statistics.mean(times), statistics.mean(tokens)


async def end_to_end(engine: Engine, intervals: tuple[int, ...], max_reasoning_tokens: int) -> dict[str, Any]:
    """Vanilla wall time, and the same greedy run probed at every blank line per interval."""
    out: dict[str, Any] = {}
    base = await agenerate_question(engine, QUESTION, Vanilla(), max_reasoning_tokens=max_reasoning_tokens, temperature=0.0)
    out["vanilla"] = {"seconds": base.timings["total"], "reasoning": base.tokens["reasoning"], "answer": base.answer}
    for interval in intervals:
        probed = await agenerate_question(
            engine,
            QUESTION,
            Vanilla(),
            max_reasoning_tokens=max_reasoning_tokens,
            probe_interval=interval,
            always_probe=True,
            temperature=0.0,
        )
        assert probed.reasoning_text == base.reasoning_text, "a probe changed the session"
        out[f"probed every >= {interval}"] = {
            "seconds": probed.timings["total"],
            "probes": len(probed.probes),
            "probe_seconds": probed.timings["probe"],
            "overhead": probed.timings["total"] / base.timings["total"] - 1,
        }
    return out


def bench_local(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    rate = asyncio.run(decode_rate(engine, args.decode_tokens))
    latency, probe_tokens = asyncio.run(probe_latency(engine))
    e2e = asyncio.run(end_to_end(engine, tuple(args.intervals), args.max_reasoning_tokens))
    return {"decode": rate, "probe_s": latency, "probe_tokens": probe_tokens, "e2e": e2e}


def bench_xllamacpp(path: str, threads: int, decode_tokens: int) -> dict[str, Any] | None:
    """xllamacpp's server API in-process: one completion request per step / per probe, its prompt
    cache reusing the prefix (what a server-style binding costs)."""
    try:
        import xllamacpp
    except ImportError:
        return None
    from codestop.engines.llamacpp import LlamaCppEngine

    tok = LlamaCppEngine.load(path, threads=threads)  # for token ids only
    prompt = tok.tokenize(FAMILIES["plain"].build_prompt(tok, QUESTION))
    probe_ids = tok.tokenize(PROBE_PROMPT)
    params = xllamacpp.CommonParams()
    params.model.path = path
    params.n_ctx = 4096
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = False
    params.verbosity = -1
    server = xllamacpp.Server(params)

    def complete(ids: list[int], n: int, **extra: Any) -> dict[str, Any]:
        return server.handle_completions(
            {"prompt": ids, "n_predict": n, "temperature": 0, "cache_prompt": True, "return_tokens": True, **extra}
        )

    complete(prompt, 4)
    t0 = time.perf_counter()
    first = complete(prompt, decode_tokens, ignore_eos=True)
    rate = first["usage"]["completion_tokens"] / (time.perf_counter() - t0)
    context = prompt + list(first.get("tokens") or tok.tokenize(first["choices"][0]["text"]))
    times = []
    for pos in (32, 64, 96, 128):
        ids = context[: len(prompt) + pos]
        complete(ids, 1)  # the step request that brought the context here (cached afterwards)
        t0 = time.perf_counter()
        complete(ids + probe_ids, PROBE_MAX_TOKENS, stop=["}"], n_probs=1)
        times.append(time.perf_counter() - t0)
    tok.close()
    return {"decode": rate, "probe_s": statistics.mean(times)}


def render(model: str, path: str, threads: int, rows: dict[str, dict[str, Any]], xl: dict[str, Any] | None, cmd: str) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION,
        "",
        f"Model: `{model}` ({Path(path).name}; an instruct model, not a reasoning model). Machine: {os.cpu_count()} "
        f"cores ({cpu}), {threads} threads, greedy. Command: `{cmd}`.",
        "",
        "| engine | decode tok/s | probe latency (ms) | probe tokens | vanilla one question (s) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['decode']:.1f} | {r['probe_s'] * 1000:.0f} | {r['probe_tokens']:.1f} | "
            f"{r['e2e']['vanilla']['seconds']:.1f} ({r['e2e']['vanilla']['reasoning']} tokens) |"
        )
    if xl is not None:
        lines.append(f"| xllamacpp server API (not chosen) | {xl['decode']:.1f} | {xl['probe_s'] * 1000:.0f} | - | - |")
    if "llamacpp" in rows and "transformers" in rows:
        speedup = rows["llamacpp"]["decode"] / rows["transformers"]["decode"]
        lines += ["", f"llama.cpp decodes **{speedup:.1f}x** faster than transformers (target >= 4x)."]
    lines += ["", "Probing overhead: the same greedy run (same length), probed at every blank line at least "
              "`probe_interval` tokens apart, never stopped, against no probes:", "",
              "| engine | probe interval | probes | probe time (s) | wall time (s) | overhead vs vanilla |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        for key, v in r["e2e"].items():
            if key == "vanilla":
                continue
            interval = key.split()[-1]
            lines.append(
                f"| {name} | {interval} | {v['probes']} | {v['probe_seconds']:.2f} | {v['seconds']:.2f} | "
                f"{v['overhead'] * 100:+.1f}% |"
            )
    lines += ["", "Target: probing adds < 15% to the wall time of a vanilla run of the same length.", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="a preset or .gguf file")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--max-reasoning-tokens", type=int, default=256)
    parser.add_argument("--intervals", type=int, nargs="+", default=[0, 16, 32])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--engines", default="llamacpp,transformers")
    parser.add_argument("--no-xllamacpp", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the figures to BENCHMARKS.md")
    args = parser.parse_args()
    from codestop.engines.llamacpp import default_threads

    threads = args.threads or default_threads()
    source = resolve_model(args.model)
    rows: dict[str, dict[str, Any]] = {}
    for name in args.engines.split(","):
        t0 = time.perf_counter()
        options = {"threads": threads} if name == "llamacpp" else {}
        engine = load_engine(args.model, engine=name, **options)
        print(f"{name}: loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows[name] = bench_local(engine, args)
        print(name, rows[name], file=sys.stderr)
        del engine
    xl = None if args.no_xllamacpp else bench_xllamacpp(source.location, threads, args.decode_tokens)
    if xl is not None:
        print("xllamacpp", xl, file=sys.stderr)
    text = render(source.name, source.location, threads, rows, xl, "python " + " ".join(sys.argv))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
