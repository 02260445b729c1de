"""The cost of one probe against context length, three ways, side by side in one run.

A probe appends the probe prompt to the live context, decodes a few tokens greedily, and must leave
the context as it was. Three ways to leave it so:
  crop       - run on the live DynamicCache, then cache.crop() back (codestop's way)
  deepcopy   - copy the cache first, run the probe on the copy (the fallback for uncroppable caches)
  recompute  - rebuild the context from scratch for every probe (what makes probing quadratic)
Also timed: one decode step at the same context length. The model has Qwen2.5-0.5B's shape with
random weights (timing does not depend on the weights; no download needed).

    python bench/probe_cost.py [--contexts 256,1024,4096] [--repeats 3] [--threads N]

Prints a table and writes bench/results/probe_cost.json and the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
PROBE_PROMPT_TOKENS = 15  # "\n**Final Answer**\n\nThe final answer is \\boxed{" in Qwen's tokenizer
PROBE_NEW_TOKENS = 4  # a GSM8K answer and its closing brace


def qwen25_05b_shape() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def forward(model, ids, cache):
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


def probe_on(model, cache, prompt):
    """Probe prompt prefill + greedy decoding on ``cache`` (mutates it)."""
    logits = forward(model, prompt, cache)
    for _ in range(PROBE_NEW_TOKENS - 1):
        logits = forward(model, [int(torch.argmax(logits))], cache)
    return int(torch.argmax(logits))


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, context_len: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(context_len)
    context = rng.integers(100, 150000, size=context_len).tolist()
    prompt = rng.integers(100, 150000, size=PROBE_PROMPT_TOKENS).tolist()
    cache = DynamicCache(config=model.config)
    forward(model, context, cache)
    before = forward(model, [context[-1]], cache).clone()  # one more token; the probe must not change what follows
    n = cache.get_seq_length()

    def decode_step():
        forward(model, [42], cache)
        cache.crop(-1)

    def with_crop():
        probe_on(model, cache, prompt)
        cache.crop(-(cache.get_seq_length() - n))

    def with_deepcopy():
        probe_on(model, copy.deepcopy(cache), prompt)

    def with_recompute():
        fresh = DynamicCache(config=model.config)
        forward(model, context + [context[-1]], fresh)
        probe_on(model, fresh, prompt)

    row = {
        "context": context_len,
        "decode_step_ms": timed(decode_step, repeats * 3) * 1e3,
        "probe_crop_ms": timed(with_crop, repeats) * 1e3,
        "probe_deepcopy_ms": timed(with_deepcopy, repeats) * 1e3,
        "probe_recompute_ms": timed(with_recompute, max(1, repeats // 2)) * 1e3,
    }
    cache.crop(-(cache.get_seq_length() - n + 1))
    after = forward(model, [context[-1]], cache)
    row["max_logit_diff_after_crop"] = float((after - before).abs().max())
    probe_tokens = PROBE_PROMPT_TOKENS + PROBE_NEW_TOKENS
    row["probe_tokens"] = probe_tokens
    row["crop_vs_own_tokens_x_decode"] = row["probe_crop_ms"] / (probe_tokens * row["decode_step_ms"])
    row["crop_vs_generated_x_decode"] = row["probe_crop_ms"] / (PROBE_NEW_TOKENS * row["decode_step_ms"])
    row["recompute_over_crop"] = row["probe_recompute_ms"] / row["probe_crop_ms"]
    return row


def table(rows) -> str:
    lines = [
        (
            "| context | decode step (ms) | probe, crop (ms) | probe, deepcopy (ms) | probe, recompute (ms) "
            "| crop / (19 tok x step) | crop / (4 generated x step) | recompute / crop | logit diff after crop |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['decode_step_ms']:.1f} | {r['probe_crop_ms']:.1f} | {r['probe_deepcopy_ms']:.1f} | "
            f"{r['probe_recompute_ms']:.1f} | {r['crop_vs_own_tokens_x_decode']:.2f}x | {r['crop_vs_generated_x_decode']:.2f}x | "
            f"{r['recompute_over_crop']:.1f}x | {r['max_logit_diff_after_crop']:.1e} |"
        )
    return "\n".join(lines)


def write_section(markdown: str) -> None:
    """Replace (or add) this benchmark's section of BENCHMARKS.md, leaving the others intact."""
    path = ROOT / "BENCHMARKS.md"
    start, end = "<!-- probe_cost:start -->", "<!-- probe_cost:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = qwen25_05b_shape()
    rows = []
    for n in (int(x) for x in args.contexts.split(",")):
        row = measure(model, n, args.repeats)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rows": rows}
    (out / "probe_cost.json").write_text(json.dumps(meta, indent=2) + "\n")
    md = table(rows)
    print(md)
    write_section(
        "## Probe cost against context length (transformers, CPU)\n\n"
        f"`python bench/probe_cost.py` on a Qwen2.5-0.5B-shaped model (random weights, float32), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} runs. A probe = "
        f"{PROBE_PROMPT_TOKENS} probe-prompt tokens prefilled + {PROBE_NEW_TOKENS} tokens decoded greedily.\n\n"
        + md
        + "\n\nTargets: a probe with crop costs no more than 1.3x (its own tokens x one decode step), and recomputing "
        "at 4K context costs at least 5x more than crop. Raw figures: `bench/results/probe_cost.json`.\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
