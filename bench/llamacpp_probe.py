"""Benchmark: two ways for the in-process llama.cpp engine to probe (issue 11, item 4).

* rollback (what the engine does): the reasoning pauses; the probe prompt and the probe's greedy
  tokens are decoded on the live sequence, then their positions are removed from the KV cache
  (``llama_memory_seq_rm``) and the reasoning goes on;
* shared-prefix sequence: the live sequence is copied to a second sequence
  (``llama_memory_seq_cp`` on a unified KV cache: the cells are shared, nothing is copied), and the
  probe runs there batched with the next reasoning tokens, one ``llama_decode`` per token pair.

Both do the same work: one probe (a probe prompt of P tokens, then K greedy tokens) and K
reasoning tokens. The script times that unit at several context lengths and prints the table.
Not a reasoning model (Qwen2.5-Coder-0.5B-Instruct by default): only the engine's mechanics count.

Usage: python bench/llamacpp_probe.py [--model qwen2.5-coder-0.5b] [--contexts 256,1024,2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from codestop.engines.llamacpp import LlamaCppEngine
from codestop.models import resolve_model

PROBE_PROMPT_TOKENS = 12  # about what "... The final answer is \\boxed{" costs
PROBE_TOKENS = 4  # an answer and its closing brace


class Context:
    """A llama context with room for two sequences on one unified KV cache."""

    def __init__(self, engine: LlamaCppEngine, n_ctx: int) -> None:
        lib = self.lib = engine.lib
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
        params.n_seq_max, params.kv_unified = 2, True
        params.n_threads = params.n_threads_batch = engine.threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(engine.model, params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create the context")
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(512, 0, 2)
        self.n_vocab = engine.n_vocab

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")

    def logits(self, i: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def argmax(self, i: int) -> int:
        return int(self.logits(i).argmax())

    def prefill(self, ids: list[int]) -> None:
        self.lib.llama_memory_clear(self.memory, True)
        for start in range(0, len(ids), 512):
            chunk = ids[start : start + 512]
            self.decode([(t, start + i, 0, i == len(chunk) - 1) for i, t in enumerate(chunk)])


def rollback_probe(c: Context, n: int, probe: list[int], reasoning: list[int]) -> list[np.ndarray]:
    """The probe on the live sequence, removed, then the reasoning tokens: their logits."""
    c.decode([(t, n + i, 0, i == len(probe) - 1) for i, t in enumerate(probe)])
    pos = n + len(probe)
    for _ in range(PROBE_TOKENS):
        c.decode([(c.argmax(-1), pos, 0, True)])
        pos += 1
    c.lib.llama_memory_seq_rm(c.memory, 0, n, -1)
    out = []
    for i, t in enumerate(reasoning):
        c.decode([(t, n + i, 0, True)])
        out.append(c.logits(-1))
    c.lib.llama_memory_seq_rm(c.memory, 0, n, -1)  # back to the same context for the next repeat
    return out


def shared_prefix_probe(c: Context, n: int, probe: list[int], reasoning: list[int]) -> list[np.ndarray]:
    """The probe on a copy of the sequence, each of its tokens in one batch with a reasoning
    token: the reasoning tokens' logits."""
    c.lib.llama_memory_seq_cp(c.memory, 0, 1, -1, -1)
    items = [(t, n + i, 1, i == len(probe) - 1) for i, t in enumerate(probe)] + [(reasoning[0], n, 0, True)]
    c.decode(items)
    out = [c.logits(len(probe))]
    probe_logits_at = len(probe) - 1
    pos = n + len(probe)
    for k in range(1, PROBE_TOKENS + 1):
        step = [(c.argmax(probe_logits_at), pos, 1, True)]
        if k < len(reasoning):
            step.append((reasoning[k], n + k, 0, True))
        c.decode(step)
        if k < len(reasoning):
            out.append(c.logits(1))
        probe_logits_at, pos = 0, pos + 1
    for k in range(PROBE_TOKENS + 1, len(reasoning)):
        c.decode([(reasoning[k], n + k, 0, True)])
        out.append(c.logits(-1))
    c.lib.llama_memory_seq_rm(c.memory, 1, -1, -1)
    c.lib.llama_memory_seq_rm(c.memory, 0, n, -1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="preset name or .gguf file")
    ap.add_argument("--contexts", default="256,1024,2048", help="context lengths (tokens) to probe at")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    engine = LlamaCppEngine.load(resolve_model(args.model).location, threads=args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    c = Context(engine, max(contexts) + 64)
    rng = np.random.default_rng(0)
    probe = [int(t) for t in rng.integers(100, 5000, PROBE_PROMPT_TOKENS)]
    reasoning = [int(t) for t in rng.integers(100, 5000, PROBE_TOKENS + 1)]
    rows: list[dict[str, Any]] = []
    for n in contexts:
        c.prefill([int(t) for t in rng.integers(100, 5000, n)])
        times: dict[str, list[float]] = {"rollback": [], "shared": []}
        logits: dict[str, list[np.ndarray]] = {}
        for _ in range(args.repeats):
            for name, fn in (("rollback", rollback_probe), ("shared", shared_prefix_probe)):
                t0 = time.perf_counter()
                logits[name] = fn(c, n, probe, reasoning)
                times[name].append(time.perf_counter() - t0)
        # does sharing a batch with the probe change the reasoning's numbers (greedy traces, replay = live)?
        diff = max(float(np.abs(a - b).max()) for a, b in zip(logits["rollback"], logits["shared"]))
        flips = sum(int(a.argmax() != b.argmax()) for a, b in zip(logits["rollback"], logits["shared"]))
        row = {"context": n, **{k: statistics.median(v) * 1000 for k, v in times.items()}, "max_logit_diff": diff, "argmax_flips": flips}
        rows.append(row)
        print(f"context {n}: rollback {row['rollback']:.0f} ms, shared-prefix sequence {row['shared']:.0f} ms", file=sys.stderr)
    print(f"One probe ({PROBE_PROMPT_TOKENS} prompt + {PROBE_TOKENS} answer tokens) and {PROBE_TOKENS + 1} reasoning "
          f"tokens, {engine.model_name}, {engine.threads} threads, median of {args.repeats} (not a reasoning model):\n")
    print("| context tokens | probe then rollback (ms) | probe on a shared-prefix sequence, batched (ms) | ratio "
          "| reasoning logits: largest difference | greedy token changed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['rollback']:.0f} | {r['shared']:.0f} | {r['shared'] / r['rollback']:.2f} "
              f"| {r['max_logit_diff']:.2g} | {r['argmax_flips']} of {len(reasoning)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
