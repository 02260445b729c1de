"""The testbed's dev-split choice (bench/testbed/PROTOCOL.md), computed from the dev traces alone.

For each prompt's dev trace file: vanilla accuracy; the share of right traces that hold their
right answer in a probe before 60% of their reasoning tokens; then, for the qualifying prompt with
the highest accuracy, the probe tokens as a share of the reasoning tokens at each candidate probe
interval. Prints the table and writes bench/testbed/choice.json.

Usage: python bench/testbed/choose.py [DEV_TRACES.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from codestop.traces import load_traces, thinned

HERE = Path(__file__).resolve().parent
PROMPTS = ("solve-then-check", "chain-of-draft", "step-by-step")
INTERVALS = (1, 32, 64, 128)
EARLY = 0.6  # "before 60% of their reasoning tokens"
QUALIFY = 0.5  # "at least half of the right traces"
PROBE_SHARE = 0.10  # "probe tokens under 10% of the reasoning tokens"


def prompt_of(path: Path) -> str:
    return path.name.removeprefix("dev-gsm8k-").removesuffix(".traces.jsonl")


def early_share(path: Path) -> tuple[float, int, int, float]:
    """Accuracy, right traces, right traces holding the right answer early, mean reasoning tokens."""
    traces = load_traces(path)
    right = [t for t in traces if t.final_correct]
    early = [t for t in right if any(p.correct and p.position < EARLY * (t.reasoning_tokens or 0) for p in t.probes)]
    mean_tokens = sum(t.reasoning_tokens or 0 for t in traces) / len(traces)
    return len(right) / len(traces), len(right), len(early), mean_tokens


def probe_share(path: Path, interval: int) -> float:
    traces = [thinned(t, interval) for t in load_traces(path)]
    probe_tokens = sum(p.probe_tokens or 0 for t in traces for p in t.probes)
    return probe_tokens / sum(t.reasoning_tokens or 0 for t in traces)


def main(paths: list[Path]) -> int:
    rows = []
    print("| prompt | traces | vanilla accuracy | right traces with the answer before 60% | mean reasoning tokens | qualifies |")
    print("|---|---:|---:|---:|---:|---|")
    for path in paths:
        n = sum(1 for line in path.open() if line.strip())
        acc, right, early, tokens = early_share(path)
        ok = right > 0 and early / right >= QUALIFY
        rows.append({"prompt": prompt_of(path), "traces": n, "accuracy": acc, "right": right, "early": early,
                     "early_share": early / right if right else 0.0, "mean_reasoning_tokens": tokens, "qualifies": ok})
        print(f"| {prompt_of(path)} | {n} | {acc * 100:.0f}% | {early}/{right} ({(early / right if right else 0) * 100:.0f}%) "
              f"| {tokens:.0f} | {'yes' if ok else 'no'} |")
    qualifying = [r for r in rows if r["qualifies"]]
    choice: dict = {"rows": rows, "criterion": "PROTOCOL.md"}
    if not qualifying:
        print("\nNo prompt qualifies: the testbed is not well posed on this model.")
        choice["prompt"] = None
    else:
        best = max(qualifying, key=lambda r: r["accuracy"])  # ties: the earlier in PROTOCOL.md's order
        path = next(p for p in paths if prompt_of(p) == best["prompt"])
        shares = {k: probe_share(path, k) for k in INTERVALS}
        interval = next((k for k in INTERVALS if shares[k] < PROBE_SHARE), INTERVALS[-1])
        print(f"\nChosen prompt: {best['prompt']} (vanilla {best['accuracy'] * 100:.0f}%).")
        print("Probe tokens / reasoning tokens by probe interval: "
              + ", ".join(f"{k}: {v * 100:.1f}%" for k, v in shares.items()) + f" -> probe interval {interval}.")
        choice.update(prompt=best["prompt"], probe_interval=interval, probe_share=shares)
    (HERE / "choice.json").write_text(json.dumps(choice, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    given = [Path(a) for a in sys.argv[1:]]
    default = [HERE / f"dev-gsm8k-{p}.traces.jsonl" for p in PROMPTS]
    sys.exit(main(given or [p for p in default if p.exists()]))
